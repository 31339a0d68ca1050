"""What a GRPO run reports, without a model: its summary gives its rewards (held out before and
after; train over the first and last tenth of its steps, each reward function's too) and its
completions' length, never the loss lines (GRPO's loss stays near 0 whether or not the rewards
rise), while an SFT run keeps its loss lines; the terminal progress lines and the hub model card
give the held-out mean reward in place of the held-out loss."""
import io
import json
from pathlib import Path

from nbtune.train.config import build_config
from nbtune.train.run import FinetuneResult


def result(tmp_path: Path, method: str, records: list[dict]) -> FinetuneResult:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = build_config({"model": "smollm2-135m-instruct", "data": "gsm8k",
                        "train": {"method": method, "max_steps": 20, "batch_size": 4, "grad_accum": 1},
                        "output": {"dir": str(tmp_path)}})
    return FinetuneResult(config=cfg, output_dir=tmp_path, adapter_dir=tmp_path / "adapter", log_path=log,
                          eval_loss_before=0.25, eval_loss_after=0.5, train_loss=-0.01, steps=20, seconds=3.0,
                          metrics=records)


def grpo_step(step: int) -> dict:
    """Step n: correctness n/100, format n/20, completions 100 + n tokens long."""
    return {"event": "train", "step": step, "loss": 0.0, "reward": step / 100 + step / 20,
            "rewards/correctness": step / 100, "rewards/format": step / 20, "completion_length": 100.0 + step}


def test_a_grpo_summary_gives_rewards_and_completion_length_not_losses(tmp_path):
    records = [{"event": "start", "step": 0, "method": "grpo"},
               {"event": "eval", "step": 0, "eval_loss": 0.25, "eval_reward": 0.125},
               *[grpo_step(n) for n in range(1, 21)],
               {"event": "eval", "step": 20, "eval_loss": 0.5, "eval_reward": 0.625},
               {"event": "summary", "step": 20, "train_loss": -0.01}]
    text = result(tmp_path, "grpo", records).summary()
    assert "held-out mean reward: 0.125 before -> 0.625 after" in text
    # 20 steps: the first tenth is steps 1-2 (reward (0.06 + 0.12) / 2), the last steps 19-20
    assert ("train mean reward: 0.090 (steps 1-2) -> 1.170 (steps 19-20); correctness 0.015 -> 0.195, "
            "format 0.075 -> 0.975") in text
    assert "completion length (mean tokens): 101.5 -> 119.5" in text
    assert "loss" not in text


def test_a_grpo_summary_without_held_out_prompts_or_with_one_reward(tmp_path):
    records = [{"event": "train", "step": n, "reward": 0.5 * n, "rewards/mine": 0.5 * n, "completion_length": 8.0}
               for n in (1, 2)]
    text = result(tmp_path, "grpo", records).summary()
    assert "held-out" not in text and "loss" not in text
    # 2 steps: a tenth is one step; one reward function: the sum is it, not repeated
    assert "train mean reward: 0.500 (step 1) -> 1.000 (step 2)\n" in text
    assert "completion length (mean tokens): 8.0 -> 8.0" in text


def test_an_sft_summary_keeps_its_loss_lines(tmp_path):
    text = result(tmp_path, "sft", [{"event": "train", "step": 1, "loss": 1.0}]).summary()
    assert "held-out loss: 0.2500 before -> 0.5000 after" in text and "train loss (mean): -0.0100" in text
    assert "reward" not in text


def test_terminal_progress_gives_a_grpo_runs_rewards(tmp_path):
    from nbtune.train.progress import TerminalProgress

    out = io.StringIO()
    progress = TerminalProgress(stream=out)
    progress({"event": "eval", "step": 0, "max_steps": 0, "eval_loss": 0.0, "eval_reward": 0.25})
    progress({"event": "train", "step": 1, "max_steps": 2, "loss": 0.0, "reward": 0.5, "lr": 1e-5})
    progress({"event": "eval", "step": 2, "max_steps": 2, "eval_loss": 0.0, "eval_reward": 0.75})
    progress({"event": "eval", "step": 0, "max_steps": 0, "eval_loss": 1.5})  # an SFT run's
    lines = out.getvalue().splitlines()
    assert lines[0] == "held-out mean reward before training: 0.250"
    assert lines[1].startswith("step 1/2 | loss 0.0000 | reward 0.500 | lr 1.00e-05")
    assert lines[2] == "step 2/2 | eval_reward 0.750"
    assert lines[3] == "held-out loss before training: 1.5000"


def test_the_model_card_of_a_grpo_run_gives_its_held_out_mean_reward(tmp_path):
    from nbtune.export.hub import model_card

    run = result(tmp_path, "grpo", [{"event": "eval", "step": 0, "eval_loss": 0.0, "eval_reward": 0.125},
                                    grpo_step(1),
                                    {"event": "eval", "step": 1, "eval_loss": 0.0, "eval_reward": 0.5}])
    card = model_card(tmp_path, run.config, ["adapter"], "me/grpo-gsm8k")
    assert "| held-out mean reward | value |" in card
    assert "| before training | 0.125 |" in card and "| after training | 0.500 |" in card
    assert "held-out loss" not in card
