"""The trainer and the host's RAM: gradient checkpointing "auto" offloads only the layers the host
holds (partial offload, said in the reason and handed to ``add_lora``), and a run whose host-RAM
budget does not fit stops before anything is loaded, with the planner's advice. The host is named
through NBTUNE_GPU (a platform profile brings its RAM) or NBTUNE_HOST_RAM (GiB), as on a real machine
gpu="auto" measures it."""
import pytest

import nbtune
from nbtune.planner import DoesNotFitError
from nbtune.planner.plan import CheckpointingChoice
from nbtune.train import run, session
from nbtune.train.config import build_config

from .conftest import tiny_config

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def _llama8b(seq_len, batch_size, **train):
    return build_config(model={"name": LLAMA_8B, "max_seq_length": seq_len},
                        train={"batch_size": batch_size, **train})


@pytest.fixture
def one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_auto_offloads_only_what_the_host_holds(one_process, monkeypatch):
    monkeypatch.setenv("NBTUNE_GPU", "colab-t4")
    choice = run.checkpointing_mode(_llama8b(24576, 2))
    mode, why = choice
    assert mode == "offload" and 0 < choice.offload_layers < 32
    assert f"host RAM holds only {choice.offload_layers} of 32 layer inputs" in why
    # the pre-flight plan made the same choice, and fits both budgets
    p = run.check_fits(_llama8b(24576, 2), force=False)
    assert p.settings.offload_layers == choice.offload_layers and p.fits and p.host_fits
    # a larger host holds them all: every layer offloaded, as before
    monkeypatch.setenv("NBTUNE_GPU", "T4")
    monkeypatch.setenv("NBTUNE_HOST_RAM", "64")
    choice = run.checkpointing_mode(_llama8b(16384, 2))
    assert choice.mode == "offload" and choice.offload_layers is None and "holds all 32" in choice.reason


def test_a_host_that_holds_no_layer_input_checkpoints_plainly(one_process, monkeypatch):
    monkeypatch.setenv("NBTUNE_GPU", "T4")
    # 7.6 GiB (7.1 with its headroom) holds the process and the loading transient (1.2 + 5.64 GiB),
    # but not one layer input of 16 x 49,152 tokens (6 GiB) beside the process and the dataset
    monkeypatch.setenv("NBTUNE_HOST_RAM", "7.6")
    choice = run.checkpointing_mode(_llama8b(49152, 16))
    assert choice.mode == "plain" and choice.offload_layers is None
    assert "host RAM holds none of the 32 layer inputs" in choice.reason
    monkeypatch.setenv("NBTUNE_HOST_RAM", "7")  # not even the loading transient
    choice = run.checkpointing_mode(_llama8b(49152, 16))
    assert choice.mode == "plain" and "cannot hold the run even with nothing offloaded" in choice.reason


def test_a_run_over_the_host_budget_stops_before_loading(one_process, monkeypatch, tmp_path):
    monkeypatch.setenv("NBTUNE_GPU", "colab-t4")

    def no_loading(cfg):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "_load_base", no_loading)
    before = session.cached_model_key()
    cfg = {"model": {"name": LLAMA_8B, "max_seq_length": 49152},
           "train": {"batch_size": 1, "gradient_checkpointing": "offload"}, "output": {"dir": str(tmp_path / "out")}}
    with pytest.raises(DoesNotFitError) as err:
        nbtune.finetune(cfg, dashboard=False, progress=False)
    text = str(err.value)
    assert "predicted not to fit in host RAM" in text and "DOES NOT FIT IN HOST RAM" in text
    assert "offloaded layer inputs (32 of 32 layers)" in text and "train.force" in text
    assert "Smallest change that fits: gradient_checkpointing: offload -> auto" in text
    assert err.value.plan.gpu_fits and err.value.plan.host_fits is False
    assert session.cached_model_key() == before and not (tmp_path / "out").exists()


def test_the_choice_reaches_add_lora(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """A partial offload chosen for the run is what add_lora gets (a CPU run: the layers past the first
    are checkpointed plainly, the first through the offload path, which on the CPU recomputes)."""
    seen = []
    real_add_lora = run.add_lora

    def add_lora(model, **kwargs):
        seen.append((kwargs["gradient_checkpointing"], kwargs["offload_layers"]))
        return real_add_lora(model, **kwargs)

    monkeypatch.setattr(run, "add_lora", add_lora)
    monkeypatch.setattr(run, "checkpointing_mode", lambda cfg, plan=None: CheckpointingChoice(
        "offload", "host RAM holds only 1 of 2 layer inputs", offload_layers=1))
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "partial", gradient_checkpointing="auto", max_steps=1,
                      warmup_steps=0)
    cfg["data"]["eval_split"] = None
    result = nbtune.finetune(cfg, dashboard=False, progress=False)
    assert seen == [("offload", 1)]
    from nbtune.kernels.offload import checkpointed_layers, offloaded_checkpoint, offloaded_checkpoint_reference

    kinds = [layer._gradient_checkpointing_func.func for layer in checkpointed_layers(result.model)]
    assert kinds == [offloaded_checkpoint, offloaded_checkpoint_reference]
    assert result.checkpointing_reason == "host RAM holds only 1 of 2 layer inputs"
