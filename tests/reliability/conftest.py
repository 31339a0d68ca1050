"""Fixtures for the bad-input tests: a tiny random Llama checkpoint, a small data file, and a
"previous run" output folder whose every byte must survive a rejected run."""
import json

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [{"prompt": f"What is {i}+{i}?", "completion": f"{i}+{i} = {2 * i}."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name": str(model_dir), "max_seq_length": 64},
        "data": {"source": str(data), "eval_split": None},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 1, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0,
                  "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 1, **train},
        "output": {"dir": str(out)},
    }
