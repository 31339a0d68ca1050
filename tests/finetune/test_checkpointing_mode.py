"""The trainer's gradient checkpointing: "auto" (the default) resolved by the planner for this GPU and
the launcher's world size, a named mode kept, the CPU path as before; the run says which and why.

The decision (``nbtune.train.run.checkpointing_mode``) is tested with a data-parallel rank faked
through the launcher's variables (WORLD_SIZE, RANK, LOCAL_RANK) and the GPU through NBTUNE_GPU,
which the planner reads for "the GPU here"; one real CPU run of the tiny model shows the mode
reaching ``add_lora``, the metrics stream, the result and the log."""
import pytest

import nbtune
from nbtune.train import run
from nbtune.train.config import build_config

from .conftest import tiny_config


def _llama8b(seq_len=2048, batch_size=2, **train):
    return build_config(model={"name": "llama-3.1-8b", "max_seq_length": seq_len},
                        train={"batch_size": batch_size, **train})


@pytest.fixture
def rank_of_two(monkeypatch):
    """This process as rank 0 of a 2-process launch (what torchrun sets)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


@pytest.mark.parametrize("mode", ["offload", "plain", "off"])
def test_a_named_mode_is_used_as_it_is(mode, rank_of_two, monkeypatch):
    monkeypatch.setenv("NBTUNE_GPU", "H200")
    assert run.checkpointing_mode(_llama8b(gradient_checkpointing=mode)) == (
        mode, "train.gradient_checkpointing in the config")


def test_data_parallel_on_a_gpu_where_plain_fits_trains_plain(rank_of_two, monkeypatch):
    monkeypatch.setenv("NBTUNE_GPU", "H200")
    mode, why = run.checkpointing_mode(_llama8b())
    assert mode == "plain" and "data parallel on 2 GPUs" in why and "H200" in why


@pytest.mark.parametrize("gpu,seq_len,batch_size", [("H200", 2048, 2), ("T4", 32768, 1)])
def test_the_preflight_plans_choice_is_the_choice(gpu, seq_len, batch_size, rank_of_two, monkeypatch):
    """The trainer hands check_fits' plan (which resolved "auto" already) to checkpointing_mode: the
    mode and reason it takes from the plan are those it would work out itself."""
    monkeypatch.setenv("NBTUNE_GPU", gpu)
    cfg = _llama8b(seq_len=seq_len, batch_size=batch_size)
    preflight_plan = run.check_fits(cfg, force=False) if gpu == "H200" else run.memory_plan(cfg)
    assert preflight_plan.checkpointing_auto
    assert run.checkpointing_mode(cfg, preflight_plan) == run.checkpointing_mode(cfg)


def test_data_parallel_where_plain_does_not_fit_offloads(rank_of_two, monkeypatch):
    monkeypatch.setenv("NBTUNE_GPU", "T4")
    mode, why = run.checkpointing_mode(_llama8b(seq_len=32768, batch_size=1))
    assert mode == "offload" and "does not fit" in why


def test_one_process_offloads(monkeypatch):
    monkeypatch.setenv("NBTUNE_GPU", "H200")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mode, why = run.checkpointing_mode(_llama8b())
    assert mode == "offload" and why.startswith("one GPU")


def test_no_gpu_keeps_the_cpu_path(rank_of_two):
    # on the CPU "auto" is what the default was before it: offload, which there is plain recomputation
    mode, why = run.checkpointing_mode(_llama8b())
    assert mode == "offload" and why.startswith("no GPU")


def test_a_model_the_planner_cannot_size_offloads(rank_of_two, monkeypatch, tmp_path):
    monkeypatch.setenv("NBTUNE_GPU", "H200")
    mode, why = run.checkpointing_mode(build_config(model={"name": str(tmp_path / "no-such-model")}))
    assert mode == "offload" and why.startswith("the planner cannot size this run")


def test_a_cpu_run_of_auto_uses_reports_and_logs_the_mode(tiny_model_dir, tiny_data, tmp_path, monkeypatch, capsys):
    seen = []
    real_add_lora = run.add_lora

    def add_lora(model, **kwargs):
        seen.append(kwargs["gradient_checkpointing"])
        return real_add_lora(model, **kwargs)

    monkeypatch.setattr(run, "add_lora", add_lora)
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "auto", gradient_checkpointing="auto", max_steps=1,
                      warmup_steps=0)
    cfg["data"]["eval_split"] = None
    result = nbtune.finetune(cfg, dashboard=False, progress=False)
    assert seen == ["offload"]
    assert result.model.get_base_model().is_gradient_checkpointing
    assert result.gradient_checkpointing == "offload" and result.checkpointing_reason.startswith("no GPU")
    assert f"gradient checkpointing: auto -> offload ({result.checkpointing_reason})" in result.summary()
    start = result.metrics[0]
    assert start["event"] == "start" and start["gradient_checkpointing"] == "offload"
    assert start["checkpointing_reason"] == result.checkpointing_reason
    err = capsys.readouterr().err
    assert f"nbtune: gradient checkpointing auto -> offload ({result.checkpointing_reason})" in err
