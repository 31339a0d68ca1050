"""RoPE at llama3-8b sizes: batch 2 x 2048 tokens, 32 q heads, 8 kv heads, head_dim 128.

q and k are HF's views, ``proj(x).view(B, S, H, D).transpose(1, 2)``; cos/sin (B, S, 128) rows as
LlamaRotaryEmbedding returns them. ``eager`` is transformers' apply_rotary_pos_emb math (in the
input dtype, as HF runs it).

Cases: forward in place (nbtune overwrites q/k; a rotation keeps the values bounded however
often it is repeated); forward out of place; forward+backward on leaves (out of place, as autograd
requires for leaves: the same bytes as in place).
"""
from __future__ import annotations

import importlib

import torch

from . import Case

BATCH, SEQ, N_Q, N_K, HEAD_DIM = 2, 2048, 32, 8, 128


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def cases(dtype) -> list[Case]:
    apply_rope = importlib.import_module("nbtune.kernels.rope").apply_rope
    elt = torch.empty((), dtype=dtype).element_size()
    qk_bytes = BATCH * SEQ * (N_Q + N_K) * HEAD_DIM * elt
    cos_sin_bytes = 2 * BATCH * SEQ * HEAD_DIM * elt

    def make_inputs(leaves=False):
        def make():
            g = torch.Generator(device="cuda").manual_seed(0)
            q_proj = torch.randn(BATCH, SEQ, N_Q * HEAD_DIM, device="cuda", dtype=dtype, generator=g)
            k_proj = torch.randn(BATCH, SEQ, N_K * HEAD_DIM, device="cuda", dtype=dtype, generator=g)
            q = q_proj.view(BATCH, SEQ, N_Q, HEAD_DIM).transpose(1, 2)
            k = k_proj.view(BATCH, SEQ, N_K, HEAD_DIM).transpose(1, 2)
            if leaves:
                q, k = q.requires_grad_(), k.requires_grad_()
            angles = torch.rand(BATCH, SEQ, HEAD_DIM // 2, device="cuda", generator=g) * 100
            emb = torch.cat((angles, angles), dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            dq, dk = torch.randn_like(q), torch.randn_like(k)
            return q, k, cos, sin, dq, dk
        return make

    def forward(fn, **kw):
        def run(q, k, cos, sin, dq, dk):
            with torch.no_grad():
                return fn(q, k, cos, sin, **kw)
        return run

    def forward_backward(fn):
        def run(q, k, cos, sin, dq, dk):
            q_out, k_out = fn(q, k, cos, sin)
            return torch.autograd.grad((q_out, k_out), (q, k), (dq, dk))
        return run

    return [
        # read q, k, cos, sin; write q, k
        Case("rope", "fwd in place", make_inputs(), {"nbtune": forward(apply_rope), "eager": forward(eager_rope)},
             bytes_moved=2 * qk_bytes + cos_sin_bytes),
        Case("rope", "fwd out of place", make_inputs(),
             {"nbtune": forward(apply_rope, inplace=False), "eager": forward(eager_rope)},
             bytes_moved=2 * qk_bytes + cos_sin_bytes, compile_eager=False),  # eager as in the case above
        # forward as above + backward (read dq, dk, cos, sin; write dq, dk)
        Case("rope", "fwd+bwd", make_inputs(leaves=True),
             {"nbtune": forward_backward(apply_rope), "eager": forward_backward(eager_rope)},
             bytes_moved=4 * qk_bytes + 2 * cos_sin_bytes),
    ]
