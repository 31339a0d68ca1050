"""The decoding step's base projection: ``x @ W^T`` for a few tokens over an NF4 llama3-8b weight.

``nbtune`` multiplies straight from the packed weight (nbtune.kernels.nf4_matmul); ``eager`` is
what the training path and bitsandbytes' ``matmul_4bit`` do for more than one token: dequantize
the weight to 16 bits (nbtune's fused NF4 kernel) and run one cuBLAS GEMM. Shapes: q/o (4096 x
4096), k/v (1024 x 4096), gate/up (14336 x 4096) and down (4096 x 14336), at 4 tokens (GRPO's
4 completions of one prompt) and at 1 (chat). bytes_moved: the packed weight, its nested scales
and the tokens in and out: what the step has to read and write at the least.
"""
from __future__ import annotations

import torch

from . import Case

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
BLOCKSIZE = 64


def _bytes(n: int, k: int, m: int, dtype: torch.dtype) -> int:
    values, size = n * k, torch.finfo(dtype).bits // 8
    blocks = values // BLOCKSIZE
    return values // 2 + blocks + (-(-blocks // 256)) * 4 + 256 * 4 + (m * k + m * n) * size


def cases(dtype: torch.dtype) -> list[Case]:
    if dtype not in (torch.float16, torch.bfloat16):
        return []

    def nbtune_impl(x, base):
        from nbtune.kernels.nf4_matmul import nf4_matmul

        return nf4_matmul(x, base)

    def eager_impl(x, base):
        from nbtune.kernels.nf4 import dequantize_base

        return torch.mm(x, dequantize_base(base, x.dtype).t())

    out = []
    for m in (4, 1):
        for label, (n, k) in SHAPES.items():
            def make_inputs(n=n, k=k, m=m):
                import bitsandbytes.functional as F

                weight = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
                packed, state = F.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
                packed.quant_state = state
                return torch.randn(m, k, device="cuda", dtype=dtype), packed

            out.append(Case(kernel="nf4_matmul", name=f"decode {m} tok {label} {n}x{k}", make_inputs=make_inputs,
                            impls={"nbtune": nbtune_impl, "eager": eager_impl}, bytes_moved=_bytes(n, k, m, dtype),
                            memory_bound=True, compile_eager=False))
    return out
