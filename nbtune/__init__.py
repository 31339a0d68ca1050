"""nbtune: notebook-first QLoRA/LoRA fine-tuning of 7-8B LLMs on a free Colab T4.

    import nbtune
    model, tokenizer = nbtune.load_model("smollm2-135m-instruct")
    model = nbtune.add_lora(model, r=16, alpha=16)
    result = nbtune.finetune({"model": "smollm2-135m-instruct", "train": {"max_steps": 30}})

In a notebook: ``%load_ext nbtune`` then a ``%%finetune`` cell. Names load lazily, so importing
nbtune does not import torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "nbtune.models",
    "add_lora": "nbtune.models",
    "load_adapter": "nbtune.models",
    "finetune": "nbtune.train",
    "build_config": "nbtune.train",
    "Config": "nbtune.train",
    "ConfigError": "nbtune.train",
    "DataError": "nbtune.train",
    "FinetuneResult": "nbtune.train",
    "read_log": "nbtune.train",
    "pull": "nbtune.assets",
    "AssetError": "nbtune.assets",
    "ModelLoadError": "nbtune.models",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'nbtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
