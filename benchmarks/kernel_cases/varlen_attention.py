"""Packed (padding-free) attention, forward+backward, 2 rows x 4096 tokens of 20 documents each.

Sizes: llama3-8b (32 query heads, 8 kv heads, head_dim 128) and Gemma 2 9B (16 / 8 heads,
head_dim 256, logit softcap 50, sliding window 4096 > every document: plain causal). Impls, all
through ``nbtune.models.patches.attention``, i.e. what a patched layer runs:

- ``nbtune``: the ``varlen`` backend (one Triton launch for the batch);
- ``eager``: the ``pieces`` backend (one SDPA, or SoftcapAttention, per document), the baseline;
- ``flash``: the ``flash`` backend (torch's FlashAttention varlen kernels; Llama shape only: a
  softcap takes the Triton kernel);
- ``flex``: the ``flex`` backend (compiled FlexAttention with a document mask);
- ``unpacked``: the same tokens as rows of one sequence each (SDPA ``is_causal``; under a softcap
  the pieces backend's SoftcapAttention): the speed a packed batch should match. It attends to
  more keys (no document boundaries), so it is an upper bound on the work. Under a softcap also
  ``unpacked-varlen``: those rows through the varlen kernel, as patched Gemma 2 runs them.

``NBTUNE_PACKED_ATTENTION`` picks among the first three in training; this case is the measurement
behind ``attention.PACKED_ATTENTION_DEFAULT``.
"""
from __future__ import annotations

import math
import os

import torch

from . import Case

ROWS, LENGTH, DOCS = 2, 4096, 20


def _plan():
    from nbtune.models.patches.attention import build_plan

    g = torch.Generator().manual_seed(0)
    positions = []
    for _ in range(ROWS):
        cuts = sorted(torch.randperm(LENGTH - 1, generator=g)[:DOCS - 1].add(1).tolist())
        bounds = [0] + cuts + [LENGTH]
        positions.append(torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])]))
    return build_plan(ROWS, LENGTH, position_ids=torch.stack(positions))


def cases(dtype) -> list[Case]:
    from nbtune.models.patches import attention as A

    plan = _plan()
    out = []
    for label, heads, kv_heads, dim, softcap in (("llama3-8b", 32, 8, 128, None), ("gemma2-9b", 16, 8, 256, 50.0)):
        scale = 1 / math.sqrt(dim)

        def make(heads=heads, kv_heads=kv_heads, dim=dim):
            g = torch.Generator(device="cuda").manual_seed(0)
            # (B, S, H, D) storage seen as (B, H, S, D), as the patched layer's projections give it
            q = torch.randn(ROWS, LENGTH, heads, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
            k = torch.randn(ROWS, LENGTH, kv_heads, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
            v = torch.randn(ROWS, LENGTH, kv_heads, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
            do = torch.randn(ROWS, LENGTH, heads, dim, device="cuda", dtype=dtype, generator=g)
            return tuple(t.requires_grad_() for t in (q, k, v)) + (do,)

        def backend(name, the_plan, softcap=softcap, scale=scale):
            def run(q, k, v, do):
                previous = os.environ.get(A.PACKED_ATTENTION_ENV)
                os.environ[A.PACKED_ATTENTION_ENV] = name
                try:
                    o = A.attend(q, k, v, the_plan, scale=scale, softcap=softcap)
                finally:
                    if previous is None:
                        os.environ.pop(A.PACKED_ATTENTION_ENV)
                    else:
                        os.environ[A.PACKED_ATTENTION_ENV] = previous
                return torch.autograd.grad(o, (q, k, v), do)
            return run

        # causal (query, key) pairs of the documents x heads x dim = MACs of one matmul; forward 2
        # matmuls, backward 5 (recompute, dV, dP, dQ, dK); 2 FLOPs per MAC
        pairs = sum((e - s) * (e - s + 1) // 2 for row in plan.pieces for s, e, _ in row)
        flops = 2 * 7 * pairs * (ROWS if plan.shared else 1) * heads * dim
        impls = {"nbtune": backend("varlen", plan), "eager": backend("pieces", plan), "flex": backend("flex", plan),
                 "unpacked": backend("pieces", A.AttentionPlan())}
        if softcap is None:  # torch's FlashAttention varlen kernels (sm_80+), where this torch has them
            impls["flash"] = backend("flash", plan)
        if softcap is not None:  # unpacked softcapped rows through the varlen kernel (one sequence per row)
            impls["unpacked-varlen"] = backend("varlen", A.AttentionPlan())
        out.append(Case("varlen_attention", f"{label} packed fwd+bwd", make, impls, flops=flops, memory_bound=False,
                        compile_eager=False))
    return out
