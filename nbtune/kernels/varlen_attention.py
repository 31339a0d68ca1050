"""Variable-length causal attention over packed documents, FlashAttention-style, forward and backward in Triton.

Layout: the documents of a batch lie end to end, ``q`` (T, Hq, D), ``k``/``v`` (T, Hk, D), with
``cu_seqlens`` (int32, ``[0, end_0, end_1, ..., T]``) their boundaries. Query i of a document sees
key j of the same document iff

    j <= i   and   (no window  or  i - j < window)        (transformers' sliding-window rule)

so nothing attends across a boundary, whatever the documents' count or lengths: one launch for a
whole packed batch instead of one attention call per document. GQA: query head h reads kv head
``h // (Hq // Hk)``; k/v are never repeated in memory.

Forward, per query row i (scores in fp32, ``c`` the optional logit softcap):

    s_ij = scale * q_i . k_j,   z_ij = c * tanh(s_ij / c)  (softcap)  or  s_ij,   masked to -inf
    p_ij = exp(z_ij - L_i),     L_i = log sum_j exp(z_ij)   (online softmax over key blocks)
    o_i  = sum_j p_ij v_j

Only ``o`` and one fp32 ``L`` per (query, head) are kept (held in base 2, ``L / ln 2``); the
(T x T) probabilities are never stored. Backward, with ``dO`` incoming, ``t = tanh(s / c)``:

    delta_i = sum_d dO_id o_id                      (= sum_j p_ij dp_ij; a preprocess kernel)
    dp_ij   = dO_i . v_j
    dz_ij   = p_ij (dp_ij - delta_i)                (softmax backward)
    ds_ij   = dz_ij * (1 - t_ij^2)   (softcap: d z / d s = 1 - t^2)   or  dz_ij
    dq_i    = scale * sum_j ds_ij k_j
    dk_j    = scale * sum_i ds_ij q_i               (summed over the query heads of k's group)
    dv_j    = sum_i p_ij dO_i                       (likewise)

The backward recomputes p from q, k and L block by block. dK/dV: one program per (key block, kv
head) walks the queries that can see its keys, for every query head of the group, accumulating in
registers; dQ: one program per (query block, query head) walks the keys. No atomics: the
gradients are deterministic.

Document bounds inside the kernels: each token's document start and end (``document_bounds``,
int32, T each) are read per row, so a tile may straddle a boundary (the mask above handles it)
and the grid is ``cdiv(T, BLOCK)`` tiles per head, with no per-document launch and no host sync.
All arithmetic is fp32 (fp32 inputs use IEEE fp32 products, not TF32); only stores cast.
"""
from __future__ import annotations

import functools
import math

import torch

from ._backend import HAS_TRITON, interpreting, next_power_of_2, use_triton
from ._launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - the reference path needs no triton
    triton = None

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634

# Tile shapes per (GPU class, padded head_dim): name -> (BLOCK_M, BLOCK_N, num_warps, num_stages).
# "fwd": BLOCK_M queries x BLOCK_N keys; "dkdv": BLOCK_N keys held, BLOCK_M queries per step;
# "dq": BLOCK_M queries held, BLOCK_N keys per step. sm_75 (T4: 64 KiB shared memory per block,
# no cp.async pipelining) gets single-stage tiles; the shared memory each needs is checked by
# compile_specs() (python -m nbtune.kernels.compile_check) for sm_75, sm_80 and sm_90.
CONFIGS = {
    ("sm75", 64): {"fwd": (64, 64, 4, 1), "dkdv": (64, 32, 4, 1), "dq": (64, 32, 4, 1)},
    ("sm75", 128): {"fwd": (64, 32, 4, 1), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)},
    ("sm75", 256): {"fwd": (32, 32, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)},
    ("sm80", 64): {"fwd": (128, 64, 4, 3), "dkdv": (64, 64, 4, 2), "dq": (64, 64, 4, 2)},
    ("sm80", 128): {"fwd": (128, 64, 8, 2), "dkdv": (64, 32, 8, 2), "dq": (64, 64, 8, 2)},
    ("sm80", 256): {"fwd": (64, 64, 8, 2), "dkdv": (32, 32, 8, 2), "dq": (64, 32, 8, 2)},
}
# Triton's interpreter (CPU tests): small, unequal tiles so that a few dozen tokens already cross
# tile and document boundaries in every kernel.
INTERPRET_CONFIG = {"fwd": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (16, 32, 1, 1)}


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                               scale: float | None = None, window: int | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """Plain-torch packed attention: per document an explicit (L x L) masked softmax in fp32 (fp64
    for fp64 inputs) under autograd, cast once to q's dtype. (T, Hq, D) -> (T, Hq, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[1] // k.shape[1]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd = q[start:end].transpose(0, 1).to(acc)                                     # (Hq, L, D)
        kd = k[start:end].transpose(0, 1).to(acc).repeat_interleave(groups, dim=0)
        vd = v[start:end].transpose(0, 1).to(acc).repeat_interleave(groups, dim=0)
        z = torch.matmul(qd, kd.transpose(-1, -2)) * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        i = torch.arange(end - start, device=q.device)[:, None]
        j = torch.arange(end - start, device=q.device)[None, :]
        allowed = j <= i
        if window is not None:
            allowed = allowed & (i - j < window)
        p = torch.softmax(z.masked_fill(~allowed, float("-inf")), dim=-1)
        outs.append(torch.matmul(p, vd).transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    return torch.cat(outs, dim=0).to(q.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        """tanh through one exp: exact limits (+-1 where exp overflows or vanishes), absolute
        error ~1e-7 in fp32, which is what the logits need."""
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """tl.dot with fp32 accumulation. PRECISION "ieee" (fp32 inputs: no TF32) or "tf32" (16-bit
        inputs, where it changes nothing); "upcast": operands cast to fp32 first, for bf16 under
        Triton's interpreter, whose dot multiplies bf16 bit patterns as integers (same math:
        products of 16-bit floats are exact in fp32)."""
        if PRECISION == "upcast":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _logits(s, sm_scale, softcap, SOFTCAP: tl.constexpr):
        """Raw dot products -> (logits in base 2, tanh term for the backward)."""
        if SOFTCAP:
            t = _tanh(s * (sm_scale / softcap))
            return t * (softcap * 1.4426950408889634), t
        return s * (sm_scale * 1.4426950408889634), s

    @triton.jit
    def _visible(q_idx, k_idx, q_doc_start, window, WINDOW: tl.constexpr):
        """Key k_idx visible from query q_idx (broadcast shapes): same document, causal, window."""
        ok = (k_idx <= q_idx) & (k_idx >= q_doc_start)
        if WINDOW:
            ok = ok & (q_idx - k_idx < window)
        return ok

    # the token count changes from step to step: not specialized on (Triton would compile a second
    # variant the first time it is a multiple of 16, in the middle of a run)
    @triton.jit(do_not_specialize=["n_tokens"])
    def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, doc_start_ptr,
        n_tokens, q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, o_stride_t, o_stride_h,
        head_dim, sm_scale, softcap, window,
        GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One (query block, query head): online softmax over the keys its queries can see."""
        first_q = tl.program_id(0) * BLOCK_M
        head = tl.program_id(1)
        kv_head = head // GROUPS
        offs_m = first_q + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < n_tokens
        d_mask = offs_d < head_dim
        q_doc_start = tl.load(doc_start_ptr + offs_m, mask=m_mask, other=0)
        q = tl.load(q_ptr + offs_m.to(tl.int64)[:, None] * q_stride_t + head * q_stride_h + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        # keys [lo, hi): from the first query's document start (or window) to the last query
        lo = tl.load(doc_start_ptr + first_q)
        if WINDOW:
            lo = tl.maximum(lo, first_q - window + 1)
        hi = tl.minimum(first_q + BLOCK_M, n_tokens)
        k_base = k_ptr + kv_head * k_stride_h
        v_base = v_ptr + kv_head * v_stride_h
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile gives p = 0, not NaN
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            kv_mask = n_mask[:, None] & d_mask[None, :]
            rows = offs_n.to(tl.int64)[:, None]
            k = tl.load(k_base + rows * k_stride_t + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + rows * v_stride_t + offs_d[None, :], mask=kv_mask, other=0.0)
            z, _ = _logits(_dot(q, tl.trans(k), PRECISION), sm_scale, softcap, SOFTCAP)
            ok = _visible(offs_m[:, None], offs_n[None, :], q_doc_start[:, None], window, WINDOW) & n_mask[None, :]
            z = tl.where(ok, z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, 1))
            p = tl.exp2(z - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
            m_i = m_new
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # 0 only in rows past the end (every real query sees itself)
        acc = acc / l_i[:, None]
        tl.store(o_ptr + offs_m.to(tl.int64)[:, None] * o_stride_t + head * o_stride_h + offs_d[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        tl.store(lse_ptr + head.to(tl.int64) * n_tokens + offs_m, m_i + tl.log2(l_i), mask=m_mask)

    @triton.jit(do_not_specialize=["n_tokens"])
    def _bwd_preprocess_kernel(
        o_ptr, do_ptr, delta_ptr,
        n_tokens, o_stride_t, o_stride_h, do_stride_t, do_stride_h, head_dim,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """delta = rowsum(dO * O) per (query, head), fp32."""
        head = tl.program_id(1)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < n_tokens
        mask = m_mask[:, None] & (offs_d < head_dim)[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        o = tl.load(o_ptr + rows * o_stride_t + head * o_stride_h + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(do_ptr + rows * do_stride_t + head * do_stride_h + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_ptr + head.to(tl.int64) * n_tokens + offs_m, delta, mask=m_mask)

    @triton.jit(do_not_specialize=["n_tokens"])
    def _bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, doc_start_ptr, doc_end_ptr,
        n_tokens, q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
        do_stride_t, do_stride_h, dk_stride_t, dk_stride_h, dv_stride_t, dv_stride_h,
        head_dim, sm_scale, softcap, window,
        GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One (key block, kv head): dK and dV summed over the queries (of every query head of
        the group) that see these keys. Works on transposed tiles (keys x queries)."""
        first_k = tl.program_id(0) * BLOCK_N
        kv_head = tl.program_id(1)
        offs_n = first_k + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_mask = offs_n < n_tokens
        d_mask = offs_d < head_dim
        kv_mask = n_mask[:, None] & d_mask[None, :]
        rows_n = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + rows_n * k_stride_t + kv_head * k_stride_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + rows_n * v_stride_t + kv_head * v_stride_h + offs_d[None, :], mask=kv_mask, other=0.0)
        # queries [lo, hi): from the first key to the end of the last key's document (or window)
        last_k = tl.minimum(first_k + BLOCK_N, n_tokens) - 1
        lo = first_k
        hi = tl.load(doc_end_ptr + last_k)
        if WINDOW:
            hi = tl.minimum(hi, last_k + window)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(GROUPS):
            head = kv_head * GROUPS + g
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                m_mask = offs_m < hi
                qd_mask = m_mask[:, None] & d_mask[None, :]
                rows_m = offs_m.to(tl.int64)[:, None]
                q = tl.load(q_ptr + rows_m * q_stride_t + head * q_stride_h + offs_d[None, :], mask=qd_mask, other=0.0)
                do = tl.load(do_ptr + rows_m * do_stride_t + head * do_stride_h + offs_d[None, :], mask=qd_mask,
                             other=0.0)
                lse = tl.load(lse_ptr + head.to(tl.int64) * n_tokens + offs_m, mask=m_mask, other=0.0)
                delta = tl.load(delta_ptr + head.to(tl.int64) * n_tokens + offs_m, mask=m_mask, other=0.0)
                q_doc_start = tl.load(doc_start_ptr + offs_m, mask=m_mask, other=0)
                z_t, t_t = _logits(_dot(k, tl.trans(q), PRECISION), sm_scale, softcap, SOFTCAP)
                ok = _visible(offs_m[None, :], offs_n[:, None], q_doc_start[None, :], window, WINDOW) & m_mask[None, :]
                p_t = tl.where(ok, tl.exp2(z_t - lse[None, :]), 0.0)
                dv += _dot(p_t.to(do.dtype), do, PRECISION)
                dp_t = _dot(v, tl.trans(do), PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                if SOFTCAP:
                    ds_t = ds_t * (1.0 - t_t * t_t)
                dk += _dot(ds_t.to(q.dtype), q, PRECISION)
        dk = dk * sm_scale
        tl.store(dk_ptr + rows_n * dk_stride_t + kv_head * dk_stride_h + offs_d[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + rows_n * dv_stride_t + kv_head * dv_stride_h + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    @triton.jit(do_not_specialize=["n_tokens"])
    def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr,
        n_tokens, q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
        do_stride_t, do_stride_h, dq_stride_t, dq_stride_h,
        head_dim, sm_scale, softcap, window,
        GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One (query block, query head): dQ over the keys its queries see."""
        first_q = tl.program_id(0) * BLOCK_M
        head = tl.program_id(1)
        kv_head = head // GROUPS
        offs_m = first_q + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < n_tokens
        d_mask = offs_d < head_dim
        qd_mask = m_mask[:, None] & d_mask[None, :]
        rows_m = offs_m.to(tl.int64)[:, None]
        q = tl.load(q_ptr + rows_m * q_stride_t + head * q_stride_h + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_ptr + rows_m * do_stride_t + head * do_stride_h + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(lse_ptr + head.to(tl.int64) * n_tokens + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + head.to(tl.int64) * n_tokens + offs_m, mask=m_mask, other=0.0)
        q_doc_start = tl.load(doc_start_ptr + offs_m, mask=m_mask, other=0)
        lo = tl.load(doc_start_ptr + first_q)
        if WINDOW:
            lo = tl.maximum(lo, first_q - window + 1)
        hi = tl.minimum(first_q + BLOCK_M, n_tokens)
        k_base = k_ptr + kv_head * k_stride_h
        v_base = v_ptr + kv_head * v_stride_h
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            kv_mask = n_mask[:, None] & d_mask[None, :]
            rows_n = offs_n.to(tl.int64)[:, None]
            k = tl.load(k_base + rows_n * k_stride_t + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + rows_n * v_stride_t + offs_d[None, :], mask=kv_mask, other=0.0)
            z, t = _logits(_dot(q, tl.trans(k), PRECISION), sm_scale, softcap, SOFTCAP)
            ok = _visible(offs_m[:, None], offs_n[None, :], q_doc_start[:, None], window, WINDOW) & n_mask[None, :]
            p = tl.where(ok, tl.exp2(z - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), PRECISION)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq += _dot(ds.to(k.dtype), k, PRECISION)
        dq = dq * sm_scale
        tl.store(dq_ptr + rows_m * dq_stride_t + head * dq_stride_h + offs_d[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=qd_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _gpu_class(device_index: int) -> str:
    major, _ = torch.cuda.get_device_capability(device_index)
    return "sm80" if major >= 8 else "sm75"


def _configs(t: torch.Tensor, block_d: int) -> dict:
    """The tile shapes for tensors like ``t`` with heads padded to ``block_d`` channels."""
    if not t.is_cuda:
        return INTERPRET_CONFIG
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return CONFIGS[(_gpu_class(index), max(64, block_d))]


def _precision(t: torch.Tensor) -> str:
    """The ``PRECISION`` constexpr of the kernels' dots (see ``_dot``)."""
    if t.dtype == torch.bfloat16 and not t.is_cuda:
        return "upcast"
    return "ieee" if t.dtype == torch.float32 else "tf32"


def document_bounds(cu_seqlens: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) of each token's document, int32 (T,) each, from the boundaries ``cu_seqlens``.
    Device ops only (no host sync); a caller attending many layers over one batch builds them once."""
    cu = cu_seqlens.to(torch.int32)
    lengths = (cu[1:] - cu[:-1]).to(torch.int64)
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=n_tokens)
    return cu[doc].contiguous(), cu[doc + 1].contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------
class _VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_start, doc_end, scale, softcap, window):
        q, k, v = _rows(q), _rows(k), _rows(v)
        n_tokens, n_heads, head_dim = q.shape
        groups = n_heads // k.shape[1]
        block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16
        configs = _configs(q, block_d)
        o = torch.empty((n_tokens, n_heads, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((n_heads, n_tokens), dtype=torch.float32, device=q.device)
        block_m, block_n, num_warps, num_stages = configs["fwd"]
        launch(
            _fwd_kernel, (triton.cdiv(n_tokens, block_m), n_heads),
            q, k, v, o, lse, doc_start,
            n_tokens, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1),
            head_dim, float(scale), float(softcap or 1.0), int(window or 0),
            GROUPS=groups, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            SOFTCAP=softcap is not None, WINDOW=window is not None, PRECISION=_precision(q),
            num_warps=num_warps, num_stages=num_stages,
        )
        ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)
        ctx.scale, ctx.softcap, ctx.window = scale, softcap, window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
        do = _rows(do)
        n_tokens, n_heads, head_dim = q.shape
        n_kv_heads = k.shape[1]
        block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16
        configs = _configs(q, block_d)
        scalars = (head_dim, float(ctx.scale), float(ctx.softcap or 1.0), int(ctx.window or 0))
        flags = dict(GROUPS=n_heads // n_kv_heads, BLOCK_D=block_d, SOFTCAP=ctx.softcap is not None,
                     WINDOW=ctx.window is not None, PRECISION=_precision(q))
        delta = torch.empty((n_heads, n_tokens), dtype=torch.float32, device=q.device)
        pre_m = 64 if q.is_cuda else 16
        launch(
            _bwd_preprocess_kernel, (triton.cdiv(n_tokens, pre_m), n_heads),
            o, do, delta, n_tokens, o.stride(0), o.stride(1), do.stride(0), do.stride(1), head_dim,
            BLOCK_M=pre_m, BLOCK_D=block_d, num_warps=4 if q.is_cuda else 1,
        )
        dq = dk = dv = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dk = torch.empty((n_tokens, n_kv_heads, head_dim), dtype=k.dtype, device=k.device)
            dv = torch.empty((n_tokens, n_kv_heads, head_dim), dtype=v.dtype, device=v.device)
            block_m, block_n, num_warps, num_stages = configs["dkdv"]
            launch(
                _bwd_dkdv_kernel, (triton.cdiv(n_tokens, block_n), n_kv_heads),
                q, k, v, do, lse, delta, dk, dv, doc_start, doc_end,
                n_tokens, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                *scalars, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=num_stages,
            )
        if ctx.needs_input_grad[0]:
            dq = torch.empty((n_tokens, n_heads, head_dim), dtype=q.dtype, device=q.device)
            block_m, block_n, num_warps, num_stages = configs["dq"]
            launch(
                _bwd_dq_kernel, (triton.cdiv(n_tokens, block_m), n_heads),
                q, k, v, do, lse, delta, dq, doc_start,
                n_tokens, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                *scalars, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=num_stages,
            )
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def _check(q, k, v, cu_seqlens):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention: q, k, v must be (tokens, heads, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}. Pack the batch rows end to end first.")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match q "
                         f"{tuple(q.shape)} in tokens and head_dim (and each other).")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads "
                         "(GQA needs num_attention_heads divisible by num_key_value_heads).")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("varlen_attention: cu_seqlens must be a 1-D integer tensor [0, end_0, ..., tokens] "
                         f"(got dtype {cu_seqlens.dtype}, shape {tuple(cu_seqlens.shape)}).")
    if cu_seqlens.device.type == "cpu":  # checked where it costs no device read
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"varlen_attention: cu_seqlens must rise from 0 to the {q.shape[0]} tokens of q "
                             f"without going down; got {cu[:4]}...{cu[-2:]}.")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     scale: float | None = None, window: int | None = None, softcap: float | None = None,
                     bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention within each packed document: q (T, Hq, D), k/v (T, Hk, D) -> (T, Hq, D).

    ``cu_seqlens`` (int32 or int64, ``[0, ..., T]``, non-decreasing) marks the documents; ``scale``
    defaults to ``1 / sqrt(D)``; ``window`` keeps keys with ``i - j < window`` (transformers'
    sliding window); ``softcap`` applies ``c * tanh(s / c)`` to the scaled scores (Gemma 2).
    ``bounds``: :func:`document_bounds` of ``cu_seqlens``, when the caller already built them.
    Heads up to 256 channels; fp16/bf16/fp32. Triton on CUDA, the reference elsewhere
    (``NBTUNE_KERNELS``).
    """
    _check(q, k, v, cu_seqlens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = None if window is None else int(window)
    if window is not None and window < 1:
        raise ValueError(f"varlen_attention: window={window} must be >= 1 (None for no sliding window).")
    softcap = None if softcap is None or softcap == 0 else float(softcap)
    if (q.numel() == 0 or q.shape[-1] > MAX_HEAD_DIM or q.dtype == torch.float64
            or not use_triton(q, k, v, cu_seqlens)):
        return varlen_attention_reference(q, k, v, cu_seqlens, scale=scale, window=window, softcap=softcap)
    if bounds is None:
        bounds = document_bounds(cu_seqlens.to(q.device), q.shape[0])
    return _VarlenAttentionFunction.apply(q, k, v, bounds[0], bounds[1], scale, softcap, window)


# --------------------------------------------------------------------------------------------
# Compile specs
# --------------------------------------------------------------------------------------------
def _signature(kernel, dtype: str) -> dict:
    """Triton types of a kernel's parameters, by naming convention: ``lse``/``delta`` fp32,
    ``doc_*`` int32, other pointers the input dtype, integers i32, scales fp32."""
    sig = {}
    for name in kernel.arg_names:
        if name.isupper():
            sig[name] = "constexpr"
        elif name in ("lse_ptr", "delta_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("doc_"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        elif name in ("sm_scale", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_specs():
    """Every kernel at each head_dim's tiles as the host launches them: fp16 for sm_75/80/90 (plain
    causal, and window + softcap, the variant with the most code), bf16 for sm_80/90 at head_dim
    128. compile_check also checks that each fits the target's shared memory (T4: 64 KiB)."""
    from .compile_check import CompileSpec

    specs = []
    kernels = (("fwd", _fwd_kernel), ("dkdv", _bwd_dkdv_kernel), ("dq", _bwd_dq_kernel))
    # (dtype, GPU class, targets, padded head_dim, GQA groups, WINDOW and SOFTCAP)
    variants = [(dtype, gpu_class, targets, block_d, groups, flags)
                for dtype, gpu_class, targets in (("fp16", "sm75", (75,)), ("fp16", "sm80", (80, 90)))
                for block_d, groups, flags in ((64, 3, False), (128, 4, False), (128, 4, True), (256, 2, True))]
    variants.append(("bf16", "sm80", (80, 90), 128, 4, False))
    for dtype, gpu_class, targets, block_d, groups, flags in variants:
        tag = f"{dtype},{gpu_class},D={block_d}{',window,softcap' if flags else ''}"
        for name, kernel in kernels:
            block_m, block_n, warps, stages = CONFIGS[(gpu_class, block_d)][name]
            cx = dict(GROUPS=groups, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SOFTCAP=flags, WINDOW=flags,
                      PRECISION="tf32")
            specs.append(CompileSpec(f"varlen_attn_{name}[{tag}]", kernel, _signature(kernel, dtype), cx, targets,
                                     dict(num_warps=warps, num_stages=stages)))
    for dtype, targets in (("fp16", (75, 80, 90)), ("bf16", (80, 90))):
        specs.append(CompileSpec(f"varlen_attn_bwd_pre[{dtype}]", _bwd_preprocess_kernel,
                                 _signature(_bwd_preprocess_kernel, dtype), dict(BLOCK_M=64, BLOCK_D=256), targets,
                                 dict(num_warps=4)))
    return specs
