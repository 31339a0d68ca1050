"""fused_linear_cross_entropy at llama3-8b's LM head: 2x2048 tokens, H=4096, V=128256.

nbtune: chunked logits GEMM + one Triton kernel per chunk (loss and in-place dlogits) + dHidden GEMM.
eager: what transformers runs: ``F.linear`` in the compute dtype, ``.float()``, ``F.cross_entropy``.
Compute-bound (the GEMMs): FLOPs are counted, not bytes. Labels: ~25 % ignored (prompt masking).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Case

N_TOKENS, HIDDEN, VOCAB = 2 * 2048, 4096, 128256


def _inputs(dtype, hidden_grad: bool, weight_grad: bool):
    def make_inputs():
        gen = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(N_TOKENS, HIDDEN, device="cuda", dtype=dtype, generator=gen)
        weight = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=dtype, generator=gen) * (2.0 / HIDDEN**0.5)
        labels = torch.randint(0, VOCAB, (N_TOKENS,), device="cuda", generator=gen)
        labels[torch.rand(N_TOKENS, device="cuda", generator=gen) < 0.25] = -100
        return hidden.requires_grad_(hidden_grad), weight.requires_grad_(weight_grad), labels

    return make_inputs


def _nbtune_forward(hidden, weight, labels):
    from nbtune.kernels import fused_linear_cross_entropy

    with torch.no_grad():
        return fused_linear_cross_entropy(hidden, weight, labels)


def _eager_forward(hidden, weight, labels):
    with torch.no_grad():
        return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def _nbtune_train(hidden, weight, labels):
    from nbtune.kernels import fused_linear_cross_entropy

    hidden.grad = weight.grad = None
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    return loss


def _eager_train(hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    loss.backward()
    return loss


def cases(dtype) -> list[Case]:
    gemm = 2 * N_TOKENS * HIDDEN * VOCAB  # one (N x H) @ (H x V)-sized matmul
    return [
        Case(kernel="cross_entropy", name="lm_head fwd (no grad)", make_inputs=_inputs(dtype, False, False),
             impls={"nbtune": _nbtune_forward, "eager": _eager_forward}, flops=gemm, memory_bound=False),
        Case(kernel="cross_entropy", name="lm_head fwd+bwd (W frozen)", make_inputs=_inputs(dtype, True, False),
             impls={"nbtune": _nbtune_train, "eager": _eager_train}, flops=2 * gemm, memory_bound=False),
        Case(kernel="cross_entropy", name="lm_head fwd+bwd (W trained)", make_inputs=_inputs(dtype, True, True),
             impls={"nbtune": _nbtune_train, "eager": _eager_train}, flops=3 * gemm, memory_bound=False),
    ]
