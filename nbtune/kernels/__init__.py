"""nbtune.kernels: the fused-kernel QLoRA core.

One file per idea, each with Triton kernel(s), a ``torch.autograd.Function`` and a plain-torch
reference (what runs on CPU and what the tests compare with). Depends on torch and triton, and on
nbtune's torch-free _env (environment variables) and _chunking (chunk budgets) below it.
Which path runs is chosen per call (see ``_backend``: NBTUNE_KERNELS=auto|reference|triton).

The public functions are imported eagerly: several share their module's name (``rms_norm``), and
the package attribute must be the function, whatever imports the submodule first.
"""
from __future__ import annotations

from ._backend import HAS_TRITON, MODE_ENV, kernel_mode, use_triton

from .cross_entropy import fused_linear_cross_entropy
from .glu import geglu, swiglu
from .linear_logprobs import TokenLogprobs, linear_logprobs
from .lora import lora_linear, lora_mlp, lora_qkv
from .nf4 import dequantize_base, nf4_dequantize
from .nf4_matmul import nf4_matmul
from .offload import enable_offloaded_checkpointing, offloaded_checkpoint
from .rms_norm import rms_norm
from .rope import apply_rope
from .varlen_attention import varlen_attention

__all__ = [
    "HAS_TRITON", "MODE_ENV", "apply_rope", "dequantize_base", "enable_offloaded_checkpointing",
    "TokenLogprobs", "fused_linear_cross_entropy", "geglu", "kernel_mode", "linear_logprobs", "lora_linear", "lora_mlp", "lora_qkv",
    "nf4_dequantize", "nf4_matmul", "offloaded_checkpoint", "rms_norm", "swiglu", "use_triton", "varlen_attention",
]
