"""NF4 dequantization of a llama3-8b MLP weight (14336 x 4096): nbtune's fused kernel vs bnb.

``eager`` is bitsandbytes' own ``dequantize_4bit`` (its CUDA kernels: for a double-quantized
weight one kernel expands the uint8 absmax to an fp32 buffer, a torch add applies the offset,
then the NF4 kernel runs). It cannot be torch.compiled, so the runner adds no ``compile`` impl.
bytes_moved = packed weight + absmax (codes, second-level scales and the 256-entry code table
when nested) + the dense output: everything read once, the output written once.
"""
from __future__ import annotations

import torch

from . import Case

OUT_FEATURES, IN_FEATURES = 14336, 4096  # llama3-8b gate/up projection
BLOCKSIZE = 64


def _nf4_bytes(n: int, dtype: torch.dtype, nested: bool) -> int:
    n_blocks = -(-n // BLOCKSIZE)
    packed = (n + 1) // 2
    if nested:
        absmax = n_blocks * 1 + (-(-n_blocks // 256)) * 4 + 256 * 4 + 4  # codes, absmax2, code2, offset
    else:
        absmax = n_blocks * 4
    return packed + absmax + n * torch.finfo(dtype).bits // 8


def cases(dtype: torch.dtype) -> list[Case]:
    if dtype not in (torch.float16, torch.bfloat16):
        return []

    def nbtune_impl(packed, quant_state):
        from nbtune.kernels.nf4 import nf4_dequantize

        return nf4_dequantize(packed, quant_state)

    def bnb_impl(packed, quant_state):
        import bitsandbytes.functional as F

        return F.dequantize_4bit(packed, quant_state)

    out = []
    for nested in (True, False):
        def make_inputs(nested=nested):
            import bitsandbytes.functional as F

            weight = torch.randn(OUT_FEATURES, IN_FEATURES, device="cuda", dtype=dtype) * 0.02
            packed, quant_state = F.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=nested,
                                                  quant_type="nf4")
            del weight
            return packed, quant_state

        out.append(Case(
            kernel="nf4",
            name=f"dequant {OUT_FEATURES}x{IN_FEATURES} {'nested' if nested else 'plain'} absmax",
            make_inputs=make_inputs,
            impls={"nbtune": nbtune_impl, "eager": bnb_impl},
            bytes_moved=_nf4_bytes(OUT_FEATURES * IN_FEATURES, dtype, nested),
            memory_bound=True,
            compile_eager=False,
        ))
    return out
