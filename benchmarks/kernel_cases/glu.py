"""GLU benchmark cases: SwiGLU / GeGLU(tanh) at llama3-8b MLP sizes (2x2048 tokens, intermediate 14336).

``eager`` is what transformers' MLPs run (``act_fn(gate) * up`` in the input dtype, autograd saving
gate, up and act(gate)); the runner adds its torch.compile. Memory-bound: bytes_moved counts each
input read once and each output written once (forward: gate, up -> h; backward: dh, gate, up ->
dgate, dup).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Case

TOKENS = 2 * 2048
INTERMEDIATE = 14336


def _inputs(dtype, requires_grad):
    def make():
        gen = torch.Generator(device="cuda").manual_seed(0)
        gate, up, dh = (torch.randn(TOKENS, INTERMEDIATE, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
        if requires_grad:
            gate.requires_grad_()
            up.requires_grad_()
        return gate, up, dh
    return make


def _fwd(fn):
    def run(gate, up, dh):
        with torch.no_grad():
            return fn(gate, up)
    return run


def _fwd_bwd(fn):
    def run(gate, up, dh):
        return torch.autograd.grad(fn(gate, up), (gate, up), dh)
    return run


def cases(dtype):
    from nbtune.kernels import geglu, swiglu

    def eager_silu(g, u):
        return F.silu(g) * u

    def eager_gelu_tanh(g, u):
        return F.gelu(g, approximate="tanh") * u

    def nbtune_gelu_tanh(g, u):
        return geglu(g, u, approximate="tanh")

    elem = torch.tensor([], dtype=dtype).element_size()
    n = TOKENS * INTERMEDIATE * elem
    out = []
    for act, nbtune_fn, eager_fn in (("swiglu", swiglu, eager_silu), ("geglu_tanh", nbtune_gelu_tanh, eager_gelu_tanh)):
        out.append(Case(
            kernel="glu", name=f"{act} fwd {TOKENS}x{INTERMEDIATE}", make_inputs=_inputs(dtype, False),
            impls={"nbtune": _fwd(nbtune_fn), "eager": _fwd(eager_fn)}, bytes_moved=3 * n,
        ))
        out.append(Case(
            kernel="glu", name=f"{act} fwd+bwd {TOKENS}x{INTERMEDIATE}", make_inputs=_inputs(dtype, True),
            impls={"nbtune": _fwd_bwd(nbtune_fn), "eager": _fwd_bwd(eager_fn)}, bytes_moved=(3 + 5) * n,
        ))
    return out
