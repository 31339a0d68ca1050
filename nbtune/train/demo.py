"""The demo run: the embedded model on the embedded GSM8K split, sized to the machine.

On a CPU it is sized so that 2 cores finish in a few minutes; on a GPU it trains longer on
longer batches. Either way it prints the held-out loss before and after training.
"""
from __future__ import annotations

import torch

from ..assets import DEFAULT_MODEL
from .config import Config, build_config


def demo_config(output_dir: str = "outputs/demo", device: str | None = None, **overrides) -> Config:
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    base = {
        "model": {"name": DEFAULT_MODEL, "max_seq_length": 512},
        "data": {"source": "gsm8k", "split": "train", "eval_split": "test"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        "train": {
            "max_steps": 120 if on_gpu else 12,
            "batch_size": 8 if on_gpu else 4,
            "grad_accum": 1,
            "lr": 1e-3,
            "warmup_steps": 1 if on_gpu else 0,
            "scheduler": "linear",
            "logging_steps": 1,
            "gradient_checkpointing": "offload" if on_gpu else "off",
            "eval_batch_size": 16,
        },
        "output": {"dir": output_dir, "overwrite": True},  # the demo's folder holds only the demo's run
    }
    if not on_gpu:
        base["data"].update(max_rows=48, eval_rows=16)
    return build_config(base, **overrides)
