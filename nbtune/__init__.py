"""nbtune: notebook-first QLoRA/LoRA fine-tuning of 7-8B LLMs on a free Colab T4.

    import nbtune
    model, tokenizer = nbtune.load_model("smollm2-135m-instruct")
    model = nbtune.add_lora(model, r=16, alpha=16)
    result = nbtune.finetune({"model": "smollm2-135m-instruct", "train": {"max_steps": 30}})

In a notebook: ``%load_ext nbtune`` then a ``%%finetune`` cell. Names load lazily, so importing
nbtune does not import torch. It does ask torch's CUDA allocator for expandable segments unless
the allocator is configured already (``nbtune/_allocator.py``; ``NBTUNE_ALLOCATOR=default`` opts out).
Using any of its names hides the third-party output a run makes irrelevant (``nbtune/quiet.py``;
``NBTUNE_VERBOSE=1`` shows everything).
"""
from __future__ import annotations

import importlib

from ._allocator import configure_allocator as _configure_allocator

__version__ = "0.1.0"

_configure_allocator()  # expandable segments, unless the user set the allocator up (see _allocator.py)

_PUBLIC = {
    "load_model": "nbtune.models",
    "add_lora": "nbtune.models",
    "load_adapter": "nbtune.models",
    "finetune": "nbtune.ui.api",
    "Dashboard": "nbtune.ui.dashboard",
    "replay": "nbtune.ui.dashboard",
    "overlay": "nbtune.ui.dashboard",
    "DryRunReport": "nbtune.train",
    "build_config": "nbtune.train",
    "Config": "nbtune.train",
    "ConfigError": "nbtune.train",
    "DataError": "nbtune.train",
    "FinetuneResult": "nbtune.train",
    "read_log": "nbtune.train",
    "preference_accuracy": "nbtune.train",
    "pull": "nbtune.assets",
    "AssetError": "nbtune.assets",
    "ModelLoadError": "nbtune.models",
    "plan": "nbtune.planner",
    "plan_from_config": "nbtune.planner",
    "PlannerWidget": "nbtune.ui.planner_widget",
}

__all__ = sorted(_PUBLIC) + ["__version__", "load_ipython_extension"]


def load_ipython_extension(ipython):
    """``%load_ext nbtune``: registers the ``%%finetune`` magic (torch loads only when a cell runs)."""
    from .ui.magic import load_ipython_extension as load

    load(ipython)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'nbtune' has no attribute {name!r}")
    from .quiet import apply as quiet_third_party

    quiet_third_party()  # before the name's module imports transformers / peft (nbtune/quiet.py)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
