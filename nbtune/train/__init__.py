"""Training: one config -> data pipeline -> TRL's SFTTrainer (or DPO / ORPO / GRPO trainer: train.method) ->
metrics stream -> adapter on disk.

Names load lazily, so ``nbtune.train.config`` (and the ``%%finetune`` magic that reads it) can be
imported without torch.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "Config": "config", "ConfigError": "config", "build_config": "config",
    "DataError": "data", "prepare_data": "data",
    "MetricsStream": "metrics", "read_log": "metrics", "preference_accuracy": "preference_eval",
    "DryRunReport": "run", "FinetuneResult": "run", "dry_run_report": "run", "finetune": "run", "memory_plan": "run",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'nbtune.train' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except Exception as e:  # a broken bitsandbytes breaks transformers' / peft's import: say the fix
        from ..models.loader import bitsandbytes_error, from_broken_bitsandbytes

        if from_broken_bitsandbytes(e):
            raise bitsandbytes_error(e, "training") from None
        raise
    globals()[name] = value
    return value


def __dir__():
    return __all__
