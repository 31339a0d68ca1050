"""Gradient checkpointing "auto" (the config's default): offload on one GPU; under data parallelism
plain where the planner says it fits this GPU, else offload. A plan of "auto" is the plan of the
mode it resolves to, and says which mode and why."""
import html

import pytest

from nbtune.planner import (PlannerError, auto_checkpointing, checkpointing_for_run, choose_checkpointing, plan,
                            plan_from_config)
from nbtune.train.config import build_config


def _config(seq_len=2048, batch_size=2, mode=None):
    train = {"batch_size": batch_size} | ({"gradient_checkpointing": mode} if mode else {})
    return build_config(model={"name": "llama-3.1-8b", "max_seq_length": seq_len}, train=train)


# (GPU, seq_len, batch, world size) -> what "auto" resolves to, and a word of its reason
CASES = [
    (("H200", 2048, 2, 1), "offload", "one GPU"),
    (("T4", 2048, 2, 1), "offload", "one GPU"),
    (("H200", 2048, 2, 2), "plain", "plain checkpointing fits"),
    (("T4", 32768, 1, 2), "offload", "does not fit"),
]


@pytest.mark.parametrize("setup, mode, why", CASES)
def test_auto_resolves_by_world_size_and_fit(setup, mode, why):
    gpu, seq, batch, world = setup
    chosen, reason = choose_checkpointing(_config(seq, batch), gpu=gpu, world_size=world)
    assert chosen == mode and why in reason, reason
    if world > 1:
        plain = plan_from_config(_config(seq, batch, "plain"), gpu=gpu, world_size=world)
        assert plain.fits is (mode == "plain")  # the planner's own verdict, with its usual headroom
        assert f"{plain.peak_gib:.2f} GiB" in reason and f"{world} GPUs" in reason


@pytest.mark.parametrize("mode", ["offload", "plain", "off"])
@pytest.mark.parametrize("gpu, seq, world", [("H200", 2048, 1), ("H200", 2048, 2), ("T4", 32768, 2)])
def test_a_mode_the_config_names_is_kept(mode, gpu, seq, world):
    chosen, reason = choose_checkpointing(_config(seq, 1, mode), gpu=gpu, world_size=world)
    assert (chosen, reason) == (mode, "train.gradient_checkpointing in the config")
    p = plan_from_config(_config(seq, 1, mode), gpu=gpu, world_size=world)
    assert p.settings.gradient_checkpointing == mode and not p.checkpointing_auto and p.checkpointing_line() is None
    assert p.to_config()["train"]["gradient_checkpointing"] == mode


@pytest.mark.parametrize("setup, mode, why", CASES)
def test_the_plan_of_auto_is_the_plan_of_its_mode(setup, mode, why):
    gpu, seq, batch, world = setup
    auto = plan_from_config(_config(seq, batch), gpu=gpu, world_size=world)
    named = plan_from_config(_config(seq, batch, mode), gpu=gpu, world_size=world)
    assert auto.settings == named.settings and auto.settings.gradient_checkpointing == mode
    assert auto.breakdown == named.breakdown and auto.peak_gib == named.peak_gib and auto.fits == named.fits
    # "auto" stays "auto" as the planner varies the set-up: where plain stops fitting it offloads
    assert auto.max_batch_size() >= named.max_batch_size() and auto.max_seq_len() >= named.max_seq_len()
    # it says which mode and why, in text, HTML and JSON, and its config keeps "auto"
    _, reason = choose_checkpointing(_config(seq, batch), gpu=gpu, world_size=world)
    assert auto.checkpointing_auto and auto.checkpointing_reason == reason
    line = f"gradient checkpointing auto -> {mode if mode == 'plain' else 'offloaded'} checkpointing: {reason}"
    assert line in repr(auto) and line not in repr(named)
    assert html.escape(line) in auto._repr_html_()
    assert auto.to_dict()["checkpointing_reason"] == reason and auto.to_dict()["checkpointing_auto"] is True
    assert auto.to_config()["train"]["gradient_checkpointing"] == "auto"
    assert build_config(auto.to_config()).train.gradient_checkpointing == "auto"


def test_plan_takes_auto_and_it_is_the_default():
    p = plan("llama-3.1-8b", gpu="H200", seq_len=2048, batch_size=2, world_size=2)
    assert p.settings.gradient_checkpointing == "plain" and p.checkpointing_auto
    assert plan("llama-3.1-8b", gpu="T4").settings.gradient_checkpointing == "offload"
    with pytest.raises(PlannerError, match="gradient_checkpointing 'sometimes': one of .*auto"):
        plan("llama-3.1-8b", gradient_checkpointing="sometimes")


def test_replace_resolves_auto_again_unless_a_mode_is_named():
    p = plan("llama-3.1-8b", gpu="T4", seq_len=16384, batch_size=1, world_size=2)
    assert p.settings.gradient_checkpointing == "plain"
    longer = p.replace(seq_len=32768)  # plain no longer fits: auto goes back to offload
    assert longer.checkpointing_auto and longer.settings.gradient_checkpointing == "offload" and longer.fits
    assert p.replace(world_size=1).settings.gradient_checkpointing == "offload"
    named = p.replace(gradient_checkpointing="plain", seq_len=32768)
    assert not named.checkpointing_auto and named.settings.gradient_checkpointing == "plain" and not named.fits
    again = named.replace(gradient_checkpointing="auto")
    assert again.checkpointing_auto and again.settings.gradient_checkpointing == "offload"


def test_world_size_comes_from_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert choose_checkpointing(_config(), gpu="H200")[0] == "plain"
    assert plan_from_config(_config(), gpu="H200").settings.gradient_checkpointing == "plain"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert choose_checkpointing(_config(), gpu="H200")[0] == "offload"


def test_one_gpu_needs_no_plan_and_the_rule_plans_only_for_data_parallel():
    def no_plan():
        raise AssertionError("planned for one GPU")

    assert auto_checkpointing(1, no_plan)[0] == "offload"
    # an unknown model on one GPU: offload without asking the planner; with 2 GPUs the planner is asked
    unknown = {"model": {"name": "/nonexistent/model-dir"}, "train": {"gradient_checkpointing": "auto"}}
    assert choose_checkpointing(unknown, gpu="T4", world_size=1)[0] == "offload"
    with pytest.raises(PlannerError):
        choose_checkpointing(unknown, gpu="T4", world_size=2)


def test_what_a_run_uses_without_a_gpu_with_a_plan_and_for_a_model_it_cannot_size(monkeypatch):
    """checkpointing_for_run, the trainer's question: no GPU here -> offload (plain recomputation on a
    CPU); a GPU planned through NBTUNE_GPU -> the rule; a pre-flight plan's resolution taken as it is;
    a model the planner cannot size -> offload; a named mode kept."""
    monkeypatch.delenv("NBTUNE_GPU", raising=False)
    mode, why = checkpointing_for_run(_config(), gpu_available=False, world_size=2)
    assert mode == "offload" and why.startswith("no GPU")
    monkeypatch.setenv("NBTUNE_GPU", "auto")  # "auto" names no GPU
    assert checkpointing_for_run(_config(), gpu_available=False, world_size=2)[1].startswith("no GPU")
    monkeypatch.setenv("NBTUNE_GPU", "H200")
    assert checkpointing_for_run(_config(), gpu_available=False, world_size=2) == choose_checkpointing(
        _config(), gpu="H200", world_size=2)
    preflight = plan_from_config(_config(32768, 1), gpu="T4", world_size=2)
    assert checkpointing_for_run(_config(32768, 1), gpu_available=True, plan=preflight, world_size=2) == (
        "offload", preflight.checkpointing_reason)
    unknown = {"model": {"name": "/nonexistent/model-dir"}}
    mode, why = checkpointing_for_run(unknown, gpu_available=False, world_size=2)
    assert mode == "offload" and why.startswith("the planner cannot size this run")
    assert checkpointing_for_run(_config(mode="plain"), gpu_available=True, world_size=1) == (
        "plain", "train.gradient_checkpointing in the config")


def test_cli_and_widget_offer_auto(capsys):
    from nbtune.ui.cli import main
    from nbtune.ui.planner_widget import PlannerWidget

    assert main(["plan", "llama-3.1-8b", "--gpu", "H200", "--num-gpus", "2"]) == 0
    assert "gradient checkpointing auto -> plain checkpointing: data parallel on 2 GPUs" in capsys.readouterr().out
    assert main(["plan", "llama-3.1-8b", "--gpu", "H200", "--num-gpus", "2", "--checkpointing", "offload"]) == 0
    assert "offloaded checkpointing" in capsys.readouterr().out
    widget = PlannerWidget()
    assert widget.checkpointing.value == "auto" and "auto" in [v for _, v in widget.checkpointing.options]
    assert widget.plan.settings.gradient_checkpointing == "offload"  # the widget plans one GPU
    widget._on_config()
    assert "gradient_checkpointing: auto" in widget.config_text.value
