"""Which implementation a kernel call runs: Triton on CUDA, the plain-torch reference elsewhere.

``NBTUNE_KERNELS`` chooses, read at every call so tests and users can flip it at run time:

- ``auto`` (default): Triton when every tensor is on a CUDA device and Triton imports, else the
  reference;
- ``reference``: always the plain-torch reference (debugging, comparisons);
- ``triton``: always Triton, CPU tensors included; on a machine without a GPU this only works
  under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how CI runs the kernels.
"""
from __future__ import annotations

import torch

from .._env import env_raw, env_text

MODE_ENV = "NBTUNE_KERNELS"
MODES = ("auto", "reference", "triton")

try:  # triton is absent on macOS / Windows / aarch64 CPU installs; the reference still works.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False


def kernel_mode() -> str:
    mode = env_text(MODE_ENV).lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r} is not one of {', '.join(MODES)}")
    return mode


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return env_raw("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel call on these tensors should take the Triton path."""
    mode = kernel_mode()
    if mode == "reference" or not HAS_TRITON:
        if mode == "triton":
            raise RuntimeError(f"{MODE_ENV}=triton but triton is not importable on this machine")
        return False
    if mode == "triton":
        return True
    for t in tensors:  # a loop, not all(<generator>): this runs ~500 times a training step
        if t is not None and not t.is_cuda:
            return False
    return True


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
