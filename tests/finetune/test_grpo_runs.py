"""GRPO runs on a tiny Llama: TRL's GRPOTrainer with nbtune's set-up. The reward signal reaches the
update (the completions rewarded above their group's mean become more likely, those below less);
nbtune's checkpointing survives generation; TRL's LM head is on the model only while it scores;
the metrics stream and the dashboard get the rewards, completion length and KL; an interrupted run
resumes; the three doors give the same GRPO run."""
import functools
import json

import pytest
import torch
import yaml

import nbtune
from nbtune.train import session

from .conftest import run_cell

pytestmark = pytest.mark.filterwarnings("ignore")

PROBE = '''
SEEN = []  # (prompts, completion ids, rewards) of every call: what the trainer generated and scored


def even_tokens(prompts, completions, completion_ids, **kwargs):
    """The share of a completion's tokens whose id is even: random completions of a random model differ
    in it, so every group has a spread to learn from."""
    rewards = [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
    SEEN.append((prompts, completion_ids, rewards))
    return rewards
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A reward module of the user's (``grpo_probe_rewards:even_tokens``) on the Python path."""
    import importlib
    import sys

    folder = tmp_path_factory.mktemp("rewards")
    (folder / "grpo_probe_rewards.py").write_text(PROBE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        yield importlib.import_module("grpo_probe_rewards")
    sys.modules.pop("grpo_probe_rewards", None)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def grpo_config(model_dir, data, out, steps=1, **train) -> dict:
    """A short GRPO run on the tiny model: 8 completions per step (2 prompts x 4), 8 tokens each."""
    return {
        "model": {"name": str(model_dir), "max_seq_length": 64},
        "data": {"source": str(data), "eval_split": None},
        "lora": {"r": 4, "alpha": 8},
        "train": {"method": "grpo", "max_steps": steps, "batch_size": 8, "grad_accum": 1, "lr": 1e-2,
                  "warmup_steps": 0, "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 1, **train},
        "grpo": {"num_generations": 4, "max_completion_length": 8, "beta": 0.04,
                 "rewards": ["grpo_probe_rewards:even_tokens"]},
        "output": {"dir": str(out)},
    }


def train_records(metrics):
    return [r for r in metrics if r.get("event") == "train"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model_dir, prompts_file, probe):
    from nbtune.models.loader import load_model
    from nbtune.ui.dashboard import Dashboard

    session.clear()
    probe.SEEN.clear()
    base, tokenizer = load_model(str(tiny_model_dir), max_seq_length=64)
    lengths = []  # the length of every forward's input, as the embedding layer sees it
    hook = base.get_input_embeddings().register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape))

    dash = Dashboard(display=False, min_interval=0)
    out = tmp_path_factory.mktemp("grpo") / "run"
    result = nbtune.finetune(grpo_config(tiny_model_dir, prompts_file, out, gradient_checkpointing="plain"),
                             model=base, tokenizer=tokenizer, dashboard=dash, progress=False)
    hook.remove()
    return result, dash, list(probe.SEEN), lengths


def _completion_logprob(model, tokenizer, prompt, completion) -> float:
    from nbtune.train.grpo_data import prompt_ids

    ids = torch.tensor([prompt_ids(prompt, tokenizer) + list(completion)])
    logits = model(input_ids=ids).logits[0, :-1].float()
    picked = logits[-len(completion):].log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])
    return picked.sum().item()


def test_the_reward_signal_reaches_the_update(grpo_run):
    """Shown: after one optimizer step, the completions that scored above their group's mean have
    become more likely under the policy and those below less (their summed log-probabilities,
    LoRA on vs off; the fresh adapter's B matrices are zero, so LoRA off is the policy that
    generated them). That is what GRPO's update is for: its gradient is the advantage-weighted
    gradient of the completions' log-probabilities. The reward (the share of even token ids)
    differs between a random model's random completions, so the groups have a spread to learn
    from; the mean reward itself cannot be shown to rise in a step or two of a random model."""
    result, _, seen, _ = grpo_run
    assert len(seen) == 1  # one step: one generation batch, scored once
    prompts, completions, rewards = seen[0]
    assert len(completions) == 8 and len({json.dumps(p) for p in prompts}) == 2  # 2 prompts x 4 completions
    model, tokenizer = result.model, result.tokenizer
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # the LoRA weights moved
    model.eval()
    with torch.no_grad():
        after = [_completion_logprob(model, tokenizer, p, c) for p, c in zip(prompts, completions)]
        with model.disable_adapter():
            before = [_completion_logprob(model, tokenizer, p, c) for p, c in zip(prompts, completions)]
    model.train()
    advantages = []
    for g in range(0, 8, 4):
        group = rewards[g:g + 4]
        advantages += [r - sum(group) / 4 for r in group]
    change = [a - b for a, b in zip(after, before)]
    above = [c for a, c in zip(advantages, change) if a > 1e-9]
    below = [c for a, c in zip(advantages, change) if a < -1e-9]
    assert above and below, rewards  # the seed gives a group with a spread
    assert min(above) > 0 > max(below)
    assert sum(a * c for a, c in zip(advantages, change)) > 0


def test_grpo_logs_rewards_completion_length_and_kl(grpo_run):
    result, dash, _, _ = grpo_run
    (rec,) = train_records(result.metrics)
    for key in ("reward", "reward_std", "rewards/even_tokens", "completion_length", "completion_clipped_share",
                "entropy", "kl", "grad_norm"):
        assert rec.get(key) is not None, key
    assert rec["reward"] == pytest.approx(rec["rewards/even_tokens"])  # one reward function: the sum is it
    assert rec["completion_length"] == 8.0 and rec["kl"] == 0.0  # the first step's policy is the reference
    assert rec["tokens"] > 8 * 8  # the prompts and the completions, counted by the trainer
    # the sampling's own cost: one generation of the step's 8 completions of 8 tokens
    assert rec["generation_tokens"] == 8 * 8 and rec["generation_s"] > 0
    assert rec["generation_tokens_per_s"] == round(64 / rec["generation_s"], 1)
    start = next(r for r in result.metrics if r["event"] == "start")
    assert start["method"] == "grpo"
    assert dash.grpo and dash.reward_names == ["even_tokens"]
    assert list(dash.trace("rewards/even_tokens").y) == [rec["rewards/even_tokens"]]
    assert list(dash.trace("completion_length").y) == [8.0] and list(dash.trace("kl").x) == [1]
    assert "reward 0." in dash.header()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_nbtune_checkpointing_survives_generation_and_trls_head_is_gone(grpo_run):
    from nbtune.kernels.offload import offloaded_checkpoint_reference

    result, _, _, _ = grpo_run
    assert result.gradient_checkpointing == "plain"
    layers = [m for m in result.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers
    for layer in layers:
        func = layer._gradient_checkpointing_func
        assert isinstance(func, functools.partial) and func.func is offloaded_checkpoint_reference
    from nbtune.models.patches.common import causal_lm_forward

    # TRL's fused head is not left on the model: its forward is nbtune's patched one again
    assert result.model.get_base_model().forward.__func__ is causal_lm_forward
    assert list(result.model.peft_config) == ["default"]  # the reference is the adapter switched off


def test_completions_are_generated_batched_with_the_kv_cache(grpo_run):
    _, _, _, lengths = grpo_run
    # one generate call for the step's 8 completions: the 2 prompts x 4 at once, then one new token per forward
    prompt_pass = [shape for shape in lengths if shape[0] == 8 and shape[1] > 1]
    one_token = [shape for shape in lengths if shape == (8, 1)]
    assert prompt_pass and len(one_token) == 8 - 1  # max_completion_length 8: the first token comes from the prompt


def test_grpo_with_the_builtin_rewards_on_gsm8k_runs(tmp_path, tiny_model_dir):
    session.clear()
    result = nbtune.finetune({
        "model": {"name": str(tiny_model_dir), "max_seq_length": 256},
        "data": {"source": "gsm8k", "max_rows": 4, "eval_rows": 2},
        "lora": {"r": 4, "alpha": 8},
        "train": {"method": "grpo", "max_steps": 1, "batch_size": 4, "grad_accum": 1, "optimizer": "adamw",
                  "gradient_checkpointing": "off", "seed": 1},
        "grpo": {"max_completion_length": 8},
        "output": {"dir": str(tmp_path / "gsm8k")}}, dashboard=False, progress=False)
    (rec,) = train_records(result.metrics)
    assert rec["rewards/correctness"] == 0.0 and rec["rewards/format"] == 0.0  # a random model: no '#### N'
    evals = [r for r in result.metrics if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 1]  # the held-out prompts, scored before and after
    assert all(r.get("eval_reward") == 0.0 and r.get("eval_completion_length") == 8.0 for r in evals)
    assert "held-out mean reward: 0.000 before -> 0.000 after" in result.summary()
    assert "held-out loss" not in result.summary()


def test_an_interrupted_grpo_run_resumes(tmp_path, tiny_model_dir, prompts_file, probe):
    import os
    import signal

    session.clear()

    def sigint_at_step_1(rec):
        if rec.get("event") == "train" and rec.get("step") == 1:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = grpo_config(tiny_model_dir, prompts_file, tmp_path / "part", steps=2)
    part = nbtune.finetune(cfg, dashboard=False, progress=False, listeners=[sigint_at_step_1])
    assert part.interrupted and part.steps == 1 and part.checkpoint.name == "checkpoint-1"
    resumed = nbtune.finetune(cfg, resume=True, dashboard=False, progress=False)
    assert resumed.resumed_from == 1 and resumed.steps == 2
    from nbtune.train.metrics import read_log

    assert [r["step"] for r in train_records(read_log(resumed.log_path))] == [1, 2]


@pytest.mark.slow  # ~20 s: three runs
def test_magic_cli_and_python_api_give_the_same_grpo_run(tmp_path, tiny_model_dir, prompts_file, probe, ip):
    session.clear()
    cfg = lambda name: grpo_config(tiny_model_dir, prompts_file, tmp_path / name, steps=2)  # noqa: E731
    api = nbtune.finetune(cfg("api"), dashboard=False, progress=False)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg("cli")))
    from nbtune.train.metrics import read_log
    from nbtune.ui.cli import main

    assert main(["finetune", str(path)]) == 0
    magic = run_cell(ip, "%%finetune --no-dashboard --out grpo_magic\n" + yaml.safe_dump(cfg("magic")))
    cli = read_log(tmp_path / "cli" / "metrics.jsonl")
    series = lambda recs, key: [r[key] for r in train_records(recs)]  # noqa: E731
    for key in ("reward", "grad_norm", "kl"):
        assert len(series(api.metrics, key)) == 2
        assert series(cli, key) == pytest.approx(series(api.metrics, key), rel=1e-5, abs=1e-7), key
        assert series(magic.metrics, key) == pytest.approx(series(api.metrics, key), rel=1e-5, abs=1e-7), key
    configs = [yaml.safe_load((tmp_path / d / "run.yaml").read_text()) for d in ("api", "cli", "magic")]
    for c in configs:
        c["output"].pop("dir")
    assert configs[0] == configs[1] == configs[2] and configs[0]["train"]["method"] == "grpo"
    assert configs[0]["grpo"]["rewards"] == ["grpo_probe_rewards:even_tokens"]
