"""Rotary position embedding (HF's rotate-half convention) on q and k in one Triton launch, in place.

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1),  x = cat(x1, x2)

applied to the first ``rot = cos.shape[-1]`` channels of each head of q (B, Hq, S, D) and
k (B, Hk, S, D) (GQA: Hk <= Hq); channels ``rot..D`` pass through unchanged (partial rotary, as
Phi-3 / GPT-NeoX-style models do). Per half: ``o1 = x1*c1 - x2*s1``, ``o2 = x2*c2 + x1*s2``.

What it fuses: HF's eager path runs ~10 kernels (two slices, a negation, a cat, four multiplies,
two adds, per tensor) and allocates the rotate_half copy and two products per tensor. Here one
launch reads each q/k element once and writes it once, and one program per token reads that
token's cos/sin row once for all heads of q and k.

What it saves: when it is safe (see ``_in_place_target``), the rotation is written into q and k
themselves (``ctx.mark_dirty``): no new q/k tensors at all. The backward needs neither q nor k,
only cos and sin (which the model holds anyway), so nothing extra is saved for it.

Backward. On the rotary channels write the map as a matrix: out = (C + S R) x with C = diag(cos),
S = diag(sin) and R the rotate_half matrix [[0, -I], [I, 0]]. R is a rotation by 90 degrees per
channel pair, so R^T = [[0, I], [-I, 0]] = -R. Hence

    dx = (C + S R)^T dy = C dy + R^T S dy = dy * cos - rotate_half(dy * sin)

and per half: ``dx1 = dy1*c1 + dy2*s2``, ``dx2 = dy2*c2 - dy1*s1``. That is the forward formula
with (s1, s2) replaced by (-s2, -s1), so the same kernel runs both ways (BACKWARD flag). The pass
through channels get dx = dy. cos/sin get no gradient (HF computes them under no_grad; when they do
require grad the public function takes the reference path, whose autograd covers them).

All arithmetic is fp32 (loads upcast, stores cast), so 16-bit results are at least as accurate as
HF's, which multiplies in the input dtype.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, next_power_of_2, use_triton
from ._launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - the reference path needs no triton
    triton = None


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin_rows(cos, sin, position_ids):
    """cos/sin as (B or 1, S, rot): gathered from (max_positions, rot) tables when position_ids is given."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return cos, sin


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_ids: torch.Tensor | None = None, *, inplace: bool = True):
    """Plain-torch RoPE in fp32, cast once to q/k's dtype. Never writes in place (``inplace`` is
    accepted for signature parity and ignored)."""
    cos, sin = _cos_sin_rows(cos, sin, position_ids)
    cos = cos.unsqueeze(1).to(torch.float32)  # (B, 1, S, rot): broadcasts over heads
    sin = sin.unsqueeze(1).to(torch.float32)
    rot = cos.shape[-1]

    def rotate(x):
        x_rot = x[..., :rot].to(torch.float32)
        out_rot = (x_rot * cos + _rotate_half(x_rot) * sin).to(x.dtype)
        return out_rot if rot == x.shape[-1] else torch.cat((out_rot, x[..., rot:]), dim=-1)

    return rotate(q), rotate(k)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rope_rotate_heads(
        in_ptr, out_ptr, in_stride_h, out_stride_h, n_heads, half_rot, n_pass,
        c1, c2, s1, s2,
        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, COPY_PASS: tl.constexpr,
    ):
        """Rotate all heads of one token: a [BLOCK_H, BLOCK_HALF] tile per half (called by _rope_kernel)."""
        heads = tl.arange(0, BLOCK_H)
        chans = tl.arange(0, BLOCK_HALF)
        head_mask = heads < n_heads
        mask = head_mask[:, None] & (chans < half_rot)[None, :]
        in_offs = heads[:, None] * in_stride_h + chans[None, :]
        out_offs = heads[:, None] * out_stride_h + chans[None, :]
        x1 = tl.load(in_ptr + in_offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(in_ptr + in_offs + half_rot, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(out_ptr + out_offs, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + out_offs + half_rot, o2.to(out_ptr.dtype.element_ty), mask=mask)
        if COPY_PASS:  # out of place with partial rotary: channels 2*half_rot.. are copied as they are
            pass_chans = tl.arange(0, BLOCK_PASS)
            pass_mask = head_mask[:, None] & (pass_chans < n_pass)[None, :]
            first = 2 * half_rot
            xp = tl.load(in_ptr + heads[:, None] * in_stride_h + first + pass_chans[None, :], mask=pass_mask)
            tl.store(out_ptr + heads[:, None] * out_stride_h + first + pass_chans[None, :],
                     xp.to(out_ptr.dtype.element_ty), mask=pass_mask)

    # the token count changes from step to step: not specialized on (Triton would compile a second
    # variant the first time it is a multiple of 16, in the middle of a run)
    @triton.jit(do_not_specialize=["seq_len"])
    def _rope_kernel(
        q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr,
        seq_len, n_q_heads, n_k_heads, half_rot, n_pass,
        q_stride_b, q_stride_h, q_stride_s, q_out_stride_b, q_out_stride_h, q_out_stride_s,
        k_stride_b, k_stride_h, k_stride_s, k_out_stride_b, k_out_stride_h, k_out_stride_s,
        cs_stride_b, cs_stride_s, pos_stride_b, pos_stride_s,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
        GATHER: tl.constexpr, COPY_PASS: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        """One program per token (b, s): rotate all q heads and all k heads of that token.

        cos/sin rows come from ``cos_ptr + b*cs_stride_b + s*cs_stride_s`` (batch stride 0 when
        they broadcast over the batch) or, with GATHER, from row ``position_ids[b, s]`` of a
        (max_positions, rot) table. BACKWARD swaps in (-s2, -s1) for (s1, s2): the transpose.
        """
        token = tl.program_id(0)
        b = (token // seq_len).to(tl.int64)
        s = (token % seq_len).to(tl.int64)
        if GATHER:
            pos = tl.load(pos_ptr + b * pos_stride_b + s * pos_stride_s).to(tl.int64)
            cs_offset = pos * cs_stride_s
        else:
            cs_offset = b * cs_stride_b + s * cs_stride_s
        chans = tl.arange(0, BLOCK_HALF)
        chan_mask = chans < half_rot
        c1 = tl.load(cos_ptr + cs_offset + chans, mask=chan_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cs_offset + half_rot + chans, mask=chan_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cs_offset + chans, mask=chan_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cs_offset + half_rot + chans, mask=chan_mask, other=0.0).to(tl.float32)
        if BACKWARD:
            s1, s2 = -s2, -s1
        _rope_rotate_heads(
            q_ptr + b * q_stride_b + s * q_stride_s, q_out_ptr + b * q_out_stride_b + s * q_out_stride_s,
            q_stride_h, q_out_stride_h, n_q_heads, half_rot, n_pass, c1, c2, s1, s2,
            BLOCK_HQ, BLOCK_HALF, BLOCK_PASS, COPY_PASS,
        )
        _rope_rotate_heads(
            k_ptr + b * k_stride_b + s * k_stride_s, k_out_ptr + b * k_out_stride_b + s * k_out_stride_s,
            k_stride_h, k_out_stride_h, n_k_heads, half_rot, n_pass, c1, c2, s1, s2,
            BLOCK_HK, BLOCK_HALF, BLOCK_PASS, COPY_PASS,
        )


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def _empty_with_layout(shape, stride, dtype, device) -> torch.Tensor:
    """A dense tensor with the same dimension order in memory as a tensor of these strides.

    For HF's ``proj(x).view(B, S, H, D).transpose(1, 2)`` that is the (B, S, H, D) order, so the
    gradient flows back through transpose/view without a copy.
    """
    order = sorted(range(len(shape)), key=lambda d: (stride[d], shape[d]), reverse=True)  # outer..inner
    dense = [0] * len(shape)
    step = 1
    for d in reversed(order):
        dense[d] = step
        step *= shape[d]
    return torch.empty_strided(tuple(shape), tuple(dense), dtype=dtype, device=device)


def _can_write_in_place(t: torch.Tensor) -> bool:
    """Whether autograd and memory allow overwriting ``t`` (a tensor that is not a view).

    Not for: leaves that need grad, inference tensors outside inference mode, tensors whose
    elements overlap (broadcast strides).
    """
    if t.requires_grad and t.is_leaf:
        return False
    if t.is_inference() and not torch.is_inference_mode_enabled():
        return False
    return not any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


class _DenseView:
    """How a view covering all of its contiguous base is rebuilt from it: view(shape) + permute.

    HF's ``proj(x).view(B, S, H, D).transpose(1, 2)`` is ``base.view(B, S, H, D).permute(0, 2, 1, 3)``.
    """

    def __init__(self, memory_shape, permutation):
        self.memory_shape = memory_shape
        self.permutation = permutation

    @classmethod
    def of(cls, t: torch.Tensor) -> "_DenseView | None":
        base = t._base
        if not base.is_contiguous() or t.data_ptr() != base.data_ptr() or t.numel() != base.numel():
            return None
        shape, stride, ndim = tuple(t.shape), t.stride(), t.dim()
        order = sorted(range(ndim), key=lambda d: (stride[d], shape[d]), reverse=True)  # outer..inner
        recipe = cls(tuple(shape[d] for d in order), tuple(order.index(d) for d in range(ndim)))
        # strides of base.view(memory_shape).permute(permutation), base being contiguous
        memory_strides, step = [0] * ndim, 1
        for i in reversed(range(ndim)):
            memory_strides[i], step = step, step * recipe.memory_shape[i]
        same = all(shape[d] <= 1 or memory_strides[recipe.permutation[d]] == stride[d] for d in range(ndim))
        return recipe if same else None

    def __call__(self, base: torch.Tensor) -> torch.Tensor:
        return base.view(self.memory_shape).permute(self.permutation)


def _in_place_target(t: torch.Tensor):
    """(tensor to overwrite and mark dirty, _DenseView rebuilding ``t`` from it or None), or None.

    A Function that modifies a *view* in place may return only one tensor (autograd's rule), so
    for a view (HF's transposed q/k) the Function overwrites its base instead, and the caller
    rebuilds the view from the returned base: two outputs, one launch, no copy.
    """
    if t.stride(-1) != 1:
        return None
    if not t._is_view():
        return (t, None) if _can_write_in_place(t) else None
    if (t.requires_grad and t.is_leaf) or t.requires_grad != t._base.requires_grad:
        return None  # the view has an autograd identity of its own (a leaf, or made under no_grad)
    if not _can_write_in_place(t._base):
        return None
    recipe = _DenseView.of(t)
    return (t._base, recipe) if recipe is not None else None


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Conservative: True when a and b share storage and their address ranges intersect."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + sum((n - 1) * st for n, st in zip(a.shape, a.stride())) * a.element_size()
    b1 = b0 + sum((n - 1) * st for n, st in zip(b.shape, b.stride())) * b.element_size()
    return a0 <= b1 and b0 <= a1


def _strides_bhs(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch(q, k, q_out, k_out, cos, sin, position_ids, backward: bool):
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    rot = cos.shape[-1]
    half_rot = rot // 2
    n_pass = head_dim - rot
    copy_pass = n_pass > 0 and q_out.data_ptr() != q.data_ptr()
    if position_ids is not None:  # (B or 1, S) indices into (max_positions, rot) tables
        pos = position_ids.expand(batch, seq_len)
        cs_stride_b, cs_stride_s = 0, cos.stride(0)
        pos_stride_b, pos_stride_s = pos.stride(0), pos.stride(1)
    else:  # (B or 1, S, rot) rows, already at the right positions
        pos = cos  # unused pointer
        cs_stride_b = cos.stride(0) if cos.shape[0] > 1 else 0
        cs_stride_s = cos.stride(1)
        pos_stride_b = pos_stride_s = 0
    block_hq = next_power_of_2(n_q_heads)
    block_half = next_power_of_2(half_rot)
    # The q tile (two halves) holds 2 * block_hq * block_half values; ~16-32 per thread.
    num_warps = 8 if 2 * block_hq * block_half >= 8192 else 4
    launch(
        _rope_kernel, (batch * seq_len,),
        q, k, q_out, k_out, cos, sin, pos,
        seq_len, n_q_heads, n_k_heads, half_rot, n_pass,
        *_strides_bhs(q), *_strides_bhs(q_out), *_strides_bhs(k), *_strides_bhs(k_out),
        cs_stride_b, cs_stride_s, pos_stride_b, pos_stride_s,
        BLOCK_HQ=block_hq, BLOCK_HK=next_power_of_2(n_k_heads), BLOCK_HALF=block_half,
        BLOCK_PASS=next_power_of_2(n_pass) if copy_pass else 1,
        GATHER=position_ids is not None, COPY_PASS=copy_pass, BACKWARD=backward,
        num_warps=num_warps,
    )


class _RoPEFunction(torch.autograd.Function):
    """Inputs q_in/k_in are q/k themselves, or (in place on a view) the bases they are rebuilt from
    by q_view/k_view. In place, q_in/k_in are overwritten, marked dirty and returned."""

    @staticmethod
    def forward(ctx, q_in, k_in, cos, sin, position_ids, q_view, k_view, inplace):
        q = q_view(q_in) if q_view is not None else q_in
        k = k_view(k_in) if k_view is not None else k_in
        if inplace:
            q_out, k_out = q, k
        else:
            q_out = _empty_with_layout(q.shape, q.stride(), q.dtype, q.device)
            k_out = _empty_with_layout(k.shape, k.stride(), k.dtype, k.device)
        _launch(q, k, q_out, k_out, cos, sin, position_ids, backward=False)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.views = (q_view, k_view)
        ctx.layouts = (q.shape, q.stride(), k.shape, k.stride())
        if inplace:
            ctx.mark_dirty(q_in, k_in)
            return q_in, k_in
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_in, dk_in):
        cos, sin, position_ids = ctx.saved_tensors
        q_view, k_view = ctx.views
        q_shape, q_stride, k_shape, k_stride = ctx.layouts

        def grad_pair(d_in, view, shape, stride):
            if view is not None:  # gradient of the base: see it through the view, write a new base
                d_in = d_in if d_in.is_contiguous() else d_in.contiguous()
                dx_in = torch.empty(d_in.shape, dtype=d_in.dtype, device=d_in.device)
                return view(d_in), view(dx_in), dx_in
            d_in = d_in if d_in.stride(-1) == 1 else d_in.contiguous()
            dx = _empty_with_layout(shape, stride, d_in.dtype, d_in.device)
            return d_in, dx, dx

        dq_out, dq, dq_ret = grad_pair(dq_in, q_view, q_shape, q_stride)
        dk_out, dk, dk_ret = grad_pair(dk_in, k_view, k_shape, k_stride)
        _launch(dq_out, dk_out, dq, dk, cos, sin, position_ids, backward=True)
        return dq_ret, dk_ret, None, None, None, None, None, None


def _check_shapes(q, k, cos, sin, position_ids):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (B, H, S, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    (bq, _, sq, dq), (bk, _, sk, dk) = q.shape, k.shape
    if (bq, sq, dq) != (bk, sk, dk):
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or head dim")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    rot = cos.shape[-1]
    if rot % 2 or rot > dq:
        raise ValueError(f"apply_rope: rotary dim {rot} must be even and <= head dim {dq}")
    if position_ids is not None:
        if cos.dim() != 2 or position_ids.dim() != 2 or position_ids.shape[-1] != sq or position_ids.shape[0] not in (1, bq):
            raise ValueError("apply_rope: with position_ids (B, S), cos/sin must be (max_positions, rot) tables")
    elif not (cos.dim() == 2 and cos.shape[0] == sq) and not (cos.dim() == 3 and cos.shape[1] == sq
                                                                and cos.shape[0] in (1, bq)):
        raise ValueError(f"apply_rope: cos of shape {tuple(cos.shape)} fits neither (S, rot) nor (B, S, rot), S={sq}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor | None = None, *, inplace: bool = True):
    """Rotate q (B, Hq, S, D) and k (B, Hk, S, D) by cos/sin; returns (q_embed, k_embed).

    cos/sin: (B, S, rot) or (1, S, rot) or (S, rot) rows as HF's rotary embedding module returns
    them (HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` with unsqueeze_dim=1), or, when
    ``position_ids`` (B, S) is given, (max_positions, rot) tables to gather from. rot < D rotates
    only the first rot channels of each head.

    On the Triton path with ``inplace=True`` (default) q and k are overwritten and returned when
    that is safe for autograd, so callers must use the returned tensors and must not reuse the
    inputs; ``inplace=False`` always returns new tensors.
    """
    _check_shapes(q, k, cos, sin, position_ids)
    if (q.numel() == 0 or k.numel() == 0 or cos.requires_grad or sin.requires_grad
            or not use_triton(q, k, cos, sin, position_ids)):
        return apply_rope_reference(q, k, cos, sin, position_ids)
    if position_ids is None and cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if position_ids is not None and position_ids.dtype not in (torch.int32, torch.int64):
        position_ids = position_ids.long()
    q_target = _in_place_target(q) if inplace and q.dtype == k.dtype else None
    k_target = _in_place_target(k) if q_target is not None else None
    if q_target is not None and k_target is not None and not _may_overlap(q_target[0], k_target[0]):
        (q_in, q_view), (k_in, k_view) = q_target, k_target
        q_out, k_out = _RoPEFunction.apply(q_in, k_in, cos, sin, position_ids, q_view, k_view, True)
        return (q_view(q_out) if q_view is not None else q_out), (k_view(k_out) if k_view is not None else k_out)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    return _RoPEFunction.apply(q, k, cos, sin, position_ids, None, None, False)


# --------------------------------------------------------------------------------------------
# Compile specs
# --------------------------------------------------------------------------------------------
def compile_specs():
    """_rope_kernel as launched at llama3-8b sizes (32 q heads, 8 kv heads, head_dim 128), forward
    in place and backward, cos/sin rows and gathered tables, plus partial rotary out of place.
    _rope_rotate_heads is a device function: it is compiled inside every _rope_kernel spec."""
    from .compile_check import CompileSpec

    specs = []
    for dtype, targets in (("fp16", (75, 80, 90)), ("bf16", (80, 90)), ("fp32", (75, 80, 90))):
        for cs_dtype in dict.fromkeys((dtype, "fp32")):
            for gather, copy_pass, backward, pass_block in (
                (False, False, False, 1),  # forward, in place, rows from HF's rotary module
                (False, False, True, 1),   # backward
                (True, False, False, 1),   # forward, gathering from tables with position_ids
                (False, True, False, 64),  # partial rotary (rot 64 of 128 -> 64 pass), out of place
            ):
                if cs_dtype != dtype and (gather or copy_pass):
                    continue
                sig = {
                    "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "q_out_ptr": f"*{dtype}", "k_out_ptr": f"*{dtype}",
                    "cos_ptr": f"*{cs_dtype}", "sin_ptr": f"*{cs_dtype}", "pos_ptr": "*i64" if gather else f"*{cs_dtype}",
                }
                for name in ("seq_len", "n_q_heads", "n_k_heads", "half_rot", "n_pass",
                             "q_stride_b", "q_stride_h", "q_stride_s", "q_out_stride_b", "q_out_stride_h",
                             "q_out_stride_s", "k_stride_b", "k_stride_h", "k_stride_s", "k_out_stride_b",
                             "k_out_stride_h", "k_out_stride_s", "cs_stride_b", "cs_stride_s",
                             "pos_stride_b", "pos_stride_s"):
                    sig[name] = "i32"
                cx = dict(BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64 if not copy_pass else 32, BLOCK_PASS=pass_block,
                          GATHER=gather, COPY_PASS=copy_pass, BACKWARD=backward)
                for name in cx:
                    sig[name] = "constexpr"
                tag = f"{dtype},cs={cs_dtype},{'bwd' if backward else 'fwd'}{',gather' if gather else ''}" \
                      f"{',partial' if copy_pass else ''}"
                specs.append(CompileSpec(f"rope[{tag}]", _rope_kernel, sig, cx, targets))
    return specs
