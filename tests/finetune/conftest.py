"""Fixtures for the three doors (magic, CLI, Python API), the dashboard and stop/resume.

Real runs are short (2-4 steps, a handful of rows, 64-128 tokens). Control-flow tests use a tiny
random Llama (hidden 64, 2 layers) with the embedded model's tokenizer; one run goes through the
magic on the embedded SmolLM2-135M-Instruct itself.
"""
import json
import os

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [{"prompt": f"What is {i}+{i}?", "completion": f"{i}+{i} = {2 * i}."} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(model_dir, data, out, **train) -> dict:
    """A 4-step run on the tiny model: 2 rows per step (batch 1 x grad_accum 2), 4 held-out rows."""
    return {
        "model": {"name": str(model_dir), "max_seq_length": 64},
        "data": {"source": str(data), "eval_split": 0.25},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 1, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 1,
                  "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 1, **train},
        "output": {"dir": str(out)},
    }


@pytest.fixture(scope="module")
def ip():
    """A real IPython shell with ``%load_ext nbtune`` (the jupysql way of testing a magic)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext nbtune").raise_error()
    yield shell


def run_cell(shell, code):
    """Run a cell; re-raise its error so the test sees it; return its value."""
    result = shell.run_cell(code)
    result.raise_error()
    return result.result


def train_losses(records) -> dict:
    """{step: loss} of a run's train records."""
    return {r["step"]: r["loss"] for r in records if r.get("event") == "train" and r.get("loss") is not None}


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("NBTUNE_GPU", raising=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
