"""DPO on the embedded preference pairs (gsm8k-preferences) with the embedded SmolLM2-135M-Instruct
learns: over a short run with a fixed seed the reward margins grow, the held-out pairs come to be
ranked right by reward, and the model's own preference for the chosen replies does not fall."""
import pytest

import nbtune
from nbtune.train import session

# ~3 minutes on 2 free cores (4 steps of 4 pairs of ~300 tokens, policy and reference, and 2 x 8 held-out pairs)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600), pytest.mark.filterwarnings("ignore")]


def test_dpo_on_the_embedded_pairs_ranks_held_out_pairs_right(tmp_path, smollm2_dir):
    session.clear()
    result = nbtune.finetune({
        "model": {"name": "smollm2-135m-instruct", "max_seq_length": 512},
        "data": {"source": "gsm8k-preferences", "max_rows": 16, "eval_rows": 8},
        "lora": {"r": 16, "alpha": 32},
        "train": {"method": "dpo", "beta": 0.1, "max_steps": 4, "batch_size": 4, "grad_accum": 1, "lr": 5e-4,
                  "warmup_steps": 0, "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 3407,
                  "eval_batch_size": 8},
        "output": {"dir": str(tmp_path / "dpo")},
    }, dashboard=False, progress=False)
    train = [r for r in result.metrics if r.get("event") == "train"]
    before, after = [r for r in result.metrics if r.get("event") == "eval"]
    margins = [r["reward_margin"] for r in train]
    # one epoch: each step's rewards are measured on pairs the model has not been trained on yet
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # the first batch meets the untouched model
    assert margins[-1] > margins[1] > 0.1
    assert all(r["reward_accuracy"] >= 0.75 for r in train[1:])
    assert train[-1]["reward_chosen"] > train[-1]["reward_rejected"]
    # the held-out pairs: every reward 0 before training, ranked right by reward after
    assert before["eval_reward_margin"] == 0.0 and before["eval_reward_accuracy"] == 0.0
    assert after["eval_reward_margin"] > 0.1 and after["eval_reward_accuracy"] >= 0.75
    assert result.eval_loss_after < result.eval_loss_before
    # the model's own preference (log-probs of the replies, LoRA off vs on) on the held-out pairs
    own = nbtune.preference_accuracy(result)
    assert own["pairs"] == 8 and own["after"] >= own["before"]
    print({"margins": [round(m, 3) for m in margins], "held_out": {k: after[k] for k in (
        "eval_reward_margin", "eval_reward_accuracy", "eval_loss")}, "own_preference": own})
