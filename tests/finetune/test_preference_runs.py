"""DPO and ORPO runs on a tiny Llama: TRL's trainers with nbtune's set-up. The log-prob head answers
TRL's fused calls with the model's own numbers; DPO's reference is the model with LoRA off (no
copy of the adapter or the weights); nbtune's checkpointing survives TRL's reference forward; the
metrics stream and the dashboard get the rewards; the three doors give the same DPO run."""
import functools
import json

import pytest
import torch
import yaml

import nbtune
from nbtune.train import session
from nbtune.train.preference import logprob_head

from .conftest import run_cell, train_losses

pytestmark = pytest.mark.filterwarnings("ignore")

REWARD_KEYS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"What is {i}+{i}?", "chosen": f"{i}+{i} = {2 * i}.", "rejected": f"{i}+{i} = {2 * i + 1}."}
            for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pref_config(model_dir, data, out, method="dpo", **train) -> dict:
    """A short preference run on the tiny model: 2 pairs per step, 4 held-out pairs."""
    return {
        "model": {"name": str(model_dir), "max_seq_length": 64},
        "data": {"source": str(data), "eval_split": 0.25},
        "lora": {"r": 4, "alpha": 8},
        "train": {"method": method, "max_steps": 3, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0,
                  "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 1, **train},
        "output": {"dir": str(out)},
    }


def records_of(result, event="train"):
    return [r for r in result.metrics if r.get("event") == event]


def test_the_log_prob_head_gives_the_models_own_log_probs(tiny_model_dir):
    from nbtune.models import add_lora, load_model
    from nbtune.models.patches import is_patched

    session.clear()
    base, tok = load_model(str(tiny_model_dir), max_seq_length=64)
    model = add_lora(base, r=4, alpha=8, gradient_checkpointing="off")
    assert is_patched(model)
    with torch.no_grad():  # a trained-looking adapter, so the LoRA path counts
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    forward = base.__dict__.get("forward")
    with logprob_head(model):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert base.__dict__.get("forward") is forward  # the forward in place before is back
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    expect = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    torch.testing.assert_close(out.log_probs, expect, rtol=1e-5, atol=1e-5)
    assert out.log_probs.requires_grad
    assert torch.equal(out.label_mask, target != -100)
    assert torch.equal(out.is_top1, (logits.argmax(-1) == target) & (target != -100))


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir, pairs_file):
    session.clear()
    out = tmp_path_factory.mktemp("dpo")
    from nbtune.ui.dashboard import Dashboard

    dash = Dashboard(display=False, min_interval=0)
    result = nbtune.finetune(pref_config(tiny_model_dir, pairs_file, out / "run", gradient_checkpointing="plain",
                                         max_steps=4), dashboard=dash, progress=False)
    return result, dash


def test_dpo_logs_rewards_margins_and_accuracy(dpo_run):
    result, dash = dpo_run
    train = records_of(result)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for rec in train:
        for key in REWARD_KEYS:
            assert key in rec and rec[key] is not None, key
        assert rec["reward_margin"] == pytest.approx(rec["reward_chosen"] - rec["reward_rejected"], abs=1e-5)
        assert 0.0 <= rec["reward_accuracy"] <= 1.0 and rec["tokens"] > 0
    evals = records_of(result, "eval")
    assert [r["step"] for r in evals] == [0, 4]
    # before training the policy is the reference: every reward is 0, the loss is ln 2
    assert evals[0]["eval_reward_margin"] == 0.0 and evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    start = next(r for r in result.metrics if r["event"] == "start")
    assert start["method"] == "dpo"
    assert dash.preference and list(dash.trace("reward_margin").x) == [1, 2, 3, 4]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_dpo_reference_is_the_model_with_lora_off(dpo_run, tiny_model_dir):
    result, _ = dpo_run
    model = result.model
    assert list(model.peft_config) == ["default"]  # TRL's "ref" copy of the adapter is gone
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    ids = torch.randint(3, 1000, (1, 10), generator=torch.Generator().manual_seed(1))
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad(), model.disable_adapter():
        off = model(input_ids=ids).logits
    with torch.no_grad():
        on = model(input_ids=ids).logits
    torch.testing.assert_close(off, fresh(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(on, off, atol=1e-4)  # the adapter trained


def test_nbtune_checkpointing_survives_the_reference_forward(dpo_run):
    from nbtune.kernels.offload import offloaded_checkpoint_reference

    result, _ = dpo_run
    assert result.gradient_checkpointing == "plain"
    layers = [m for m in result.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers
    for layer in layers:
        func = layer._gradient_checkpointing_func
        assert isinstance(func, functools.partial) and func.func is offloaded_checkpoint_reference


def test_orpo_runs_and_logs_its_metrics(tmp_path, tiny_model_dir, pairs_file):
    session.clear()
    result = nbtune.finetune(pref_config(tiny_model_dir, pairs_file, tmp_path / "orpo", method="orpo", max_steps=2),
                             dashboard=False, progress=False)
    train = records_of(result)
    assert [r["step"] for r in train] == [1, 2]
    for rec in train:
        for key in (*REWARD_KEYS, "nll_loss", "log_odds_ratio"):
            assert rec.get(key) is not None, key
        # ORPO's reward is beta times the mean reply-token log-prob; its loss adds the chosen replies' loss
        assert rec["loss"] > rec["nll_loss"] > 0 and rec["tokens"] > 0
    assert result.eval_loss_after is not None and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert records_of(result, "eval")[-1]["eval_reward_accuracy"] is not None


def test_magic_cli_and_python_api_give_the_same_dpo_run(tmp_path, tiny_model_dir, pairs_file, ip):
    session.clear()
    cfg = lambda name: pref_config(tiny_model_dir, pairs_file, tmp_path / name, max_steps=2)  # noqa: E731
    api = nbtune.finetune(cfg("api"), dashboard=False, progress=False)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg("cli")))
    from nbtune.train.metrics import read_log
    from nbtune.ui.cli import main

    assert main(["finetune", str(path)]) == 0
    magic = run_cell(ip, "%%finetune --no-dashboard --out dpo_magic\n" + yaml.safe_dump(cfg("magic")))
    cli = read_log(tmp_path / "cli" / "metrics.jsonl")
    margins = lambda recs: [r["reward_margin"] for r in recs if r.get("event") == "train"]  # noqa: E731
    assert list(train_losses(api.metrics)) == [1, 2]
    assert train_losses(cli) == pytest.approx(train_losses(api.metrics), rel=1e-6)
    assert train_losses(magic.metrics) == pytest.approx(train_losses(api.metrics), rel=1e-6)
    assert margins(cli) == pytest.approx(margins(api.metrics), rel=1e-5, abs=1e-7)
    assert margins(magic.metrics) == pytest.approx(margins(api.metrics), rel=1e-5, abs=1e-7)
    configs = [yaml.safe_load((tmp_path / d / "run.yaml").read_text()) for d in ("api", "cli", "magic")]
    for c in configs:
        c["output"].pop("dir")
    assert configs[0] == configs[1] == configs[2] and configs[0]["train"]["method"] == "dpo"


def test_an_interrupted_dpo_run_resumes_onto_the_same_curve(dpo_run, tmp_path, tiny_model_dir, pairs_file):
    import os
    import signal

    straight, _ = dpo_run

    def sigint_at_step_2(rec):
        if rec.get("event") == "train" and rec.get("step") == 2 and "loss" in rec:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = pref_config(tiny_model_dir, pairs_file, tmp_path / "part", gradient_checkpointing="plain", max_steps=4)
    part = nbtune.finetune(cfg, dashboard=False, progress=False, listeners=[sigint_at_step_2])
    assert part.interrupted and part.steps == 2 and part.checkpoint.name == "checkpoint-2"
    resumed = nbtune.finetune(cfg, resume=True, dashboard=False, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    from nbtune.train.metrics import read_log

    log = read_log(resumed.log_path)
    assert train_losses(log) == pytest.approx(train_losses(straight.metrics), rel=1e-5)
    margins = lambda recs: {r["step"]: r["reward_margin"] for r in recs if r.get("event") == "train"}  # noqa: E731
    assert margins(log) == pytest.approx(margins(straight.metrics), rel=1e-4, abs=1e-6)
