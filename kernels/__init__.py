"""nbtune.kernels: the fused-kernel QLoRA core.

One file per idea, each with Triton kernel(s), a ``torch.autograd.Function`` and a plain-torch
reference (what runs on CPU and what the tests compare with). Depends on torch and triton only.
Which path runs is chosen per call (see ``_backend``: NBTUNE_KERNELS=auto|reference|triton).

Names are loaded lazily so ``import nbtune.kernels`` stays cheap.
"""
from __future__ import annotations

import importlib

from ._backend import HAS_TRITON, MODE_ENV, kernel_mode, use_triton

_PUBLIC = {
    "nf4_dequantize": "nf4",
    "dequantize_base": "nf4",
    "rms_norm": "rms_norm",
    "apply_rope": "rope",
    "swiglu": "glu",
    "geglu": "glu",
    "lora_linear": "lora",
    "lora_mlp": "lora",
    "lora_qkv": "lora",
    "fused_linear_cross_entropy": "cross_entropy",
    "offloaded_checkpoint": "offload",
}

__all__ = sorted(_PUBLIC) + ["HAS_TRITON", "MODE_ENV", "kernel_mode", "use_triton"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'nbtune.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
