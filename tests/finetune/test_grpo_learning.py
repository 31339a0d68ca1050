"""GRPO on the embedded SmolLM2-135M-Instruct learns what its reward asks for: with a reward for
short completions (minus the completion's length), over a short run with a fixed seed the mean
reward rises and the completions get shorter."""
import json

import pytest

import nbtune
from nbtune.train import session

# about a minute on two idle cores: 8 steps of 8 completions of up to 32 tokens, each generated,
# scored and trained on
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600), pytest.mark.filterwarnings("ignore")]

REWARD = '''
def brevity(prompts, completions, completion_ids, **kwargs):
    """Minus the completion's length, in units of max_completion_length (32 tokens)."""
    return [-len(ids) / 32 for ids in completion_ids]
'''

QUESTIONS = [
    "What is the capital of France?", "Name a primary colour.", "What is 7 times 6?", "Who wrote Hamlet?",
    "What is the boiling point of water in Celsius?", "Give me a synonym for happy.",
    "How many legs does a spider have?", "What planet is closest to the sun?", "What is the square root of 81?",
    "Translate 'hello' into Spanish.", "What gas do plants absorb?", "How many days are in a week?",
    "What is 15 minus 8?", "What colour is the sky?", "Name a mammal that can fly.", "What is the largest ocean?",
]


def test_grpo_raises_the_mean_reward_of_the_embedded_model(tmp_path, monkeypatch, smollm2_dir):
    """Shown: the mean reward of the completions sampled at each step (before that step's update)
    rises over the run. A reward the instruct model meets unevenly from the start (its replies to
    short questions run from a few tokens to the 32-token cap) gives every group a spread to learn
    from; GRPO moves the policy towards the shorter replies of each group."""
    (tmp_path / "brevity_reward.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS), encoding="utf-8")
    session.clear()
    result = nbtune.finetune({
        "model": {"name": "smollm2-135m-instruct", "max_seq_length": 256},
        "data": {"source": str(data), "eval_split": None},
        "lora": {"r": 16, "alpha": 32},
        "train": {"method": "grpo", "max_steps": 8, "batch_size": 8, "grad_accum": 1, "lr": 5e-4, "warmup_steps": 0,
                  "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 3407},
        "grpo": {"num_generations": 4, "max_completion_length": 32, "rewards": ["brevity_reward:brevity"]},
        "output": {"dir": str(tmp_path / "grpo")},
    }, dashboard=False, progress=False)
    train = [r for r in result.metrics if r.get("event") == "train"]
    rewards = [r["reward"] for r in train]
    lengths = [r["completion_length"] for r in train]
    assert len(train) == 8 and all(r["reward_std"] > 0 for r in train)  # every step's groups had a spread
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2  # (one epoch: each step meets 2 new prompts)
    assert lengths[-1] < lengths[0] - 5
    assert rewards == pytest.approx([-n / 32 for n in lengths])  # the one reward is minus the mean length
    print({"reward": [round(r, 3) for r in rewards], "completion_length": lengths})
