"""RMSNorm at llama3-8b sizes: 2x2048 tokens, hidden 4096.

Cases: forward; forward+backward with the weight frozen (LoRA: dx only); forward+backward with a
trainable weight (dx and dw); Gemma's (1 + w) form forward+backward (frozen). ``eager`` is the
plain-torch reference, i.e. transformers' LlamaRMSNorm / GemmaRMSNorm math.
"""
from __future__ import annotations

import importlib

import torch

from . import Case

TOKENS, HIDDEN, EPS = 2 * 2048, 4096, 1e-5


def _module():
    # nbtune.kernels.rms_norm is both a module and a function name: import the module by name
    return importlib.import_module("nbtune.kernels.rms_norm")


def cases(dtype) -> list[Case]:
    mod = _module()
    nbtune_fn, eager_fn = mod.rms_norm, mod.rms_norm_reference
    elt = torch.empty((), dtype=dtype).element_size()
    act = TOKENS * HIDDEN * elt  # one activation-sized tensor
    w_bytes = HIDDEN * elt

    def make_inputs(weight_grad=False, offset=0.0):
        def make():
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=dtype, generator=g).requires_grad_()
            w_center = 1.0 if offset == 0.0 else 0.0  # Gemma stores w around 0 (used as 1 + w)
            w = w_center + 0.1 * torch.randn(HIDDEN, device="cuda", dtype=dtype, generator=g)
            w.requires_grad_(weight_grad)
            dy = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=dtype, generator=g)
            return x, w, dy
        return make

    def forward(fn, offset=0.0):
        def run(x, w, dy):
            with torch.no_grad():
                return fn(x, w, EPS, offset)
        return run

    def forward_backward(fn, offset=0.0):
        def run(x, w, dy):
            y = fn(x, w, EPS, offset)
            inputs = (x, w) if w.requires_grad else (x,)
            return torch.autograd.grad(y, inputs, dy)
        return run

    return [
        # read x (+ w), write y
        Case("rms_norm", "fwd", make_inputs(), {"nbtune": forward(nbtune_fn), "eager": forward(eager_fn)},
             bytes_moved=2 * act + w_bytes),
        # forward (read x, write y) + backward (read x, dy; write dx)
        Case("rms_norm", "fwd+bwd frozen w", make_inputs(),
             {"nbtune": forward_backward(nbtune_fn), "eager": forward_backward(eager_fn)},
             bytes_moved=5 * act + w_bytes),
        # + dw (HIDDEN values)
        Case("rms_norm", "fwd+bwd trainable w", make_inputs(weight_grad=True),
             {"nbtune": forward_backward(nbtune_fn), "eager": forward_backward(eager_fn)},
             bytes_moved=5 * act + 2 * w_bytes),
        Case("rms_norm", "gemma fwd+bwd frozen w", make_inputs(offset=1.0),
             {"nbtune": forward_backward(nbtune_fn, 1.0), "eager": forward_backward(eager_fn, 1.0)},
             bytes_moved=5 * act + w_bytes),
    ]
