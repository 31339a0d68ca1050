"""LoRA over a frozen (4-bit NF4 or 16-bit) base: one projection, Q/K/V together, and the gated MLP.

A LoRA projection is ``Y = X W^T (+ b) + s (X A^T) B^T`` with peft's shapes: ``W`` (out, in) frozen,
``A`` (r, in), ``B`` (out, r), ``s = lora_alpha / r``; X is (tokens, in) after flattening the
leading dimensions. ``W`` is whatever :func:`nbtune.kernels.nf4.dequantize_base` makes of the base
(a bitsandbytes ``Params4bit`` / ``Linear4bit``, an ``nn.Linear`` or a plain tensor).

What the hand-written backward saves, compared with peft over bitsandbytes under autograd:

- no gradient for the frozen base is ever formed; the dequantized ``W`` lives only for the one
  matmul that needs it, in the forward and again (dequantized anew) in the backward, and is never
  kept between them;
- saved for the backward: X and the r-wide ``X A^T`` per projection (tokens x r: a few hundred
  KiB), nothing (tokens x out)-sized. The MLP keeps X, ``gate`` and ``up`` only: ``act(gate)``
  and ``h = act(gate) * up`` are recomputed by the GLU backward kernel, which also writes
  ``dgate``/``dup`` over the saved ``gate``/``up`` and the recomputed ``h`` over ``dh``. At
  llama3-8b sizes (4096 tokens, bf16) that is 32 + 2 x 112 MiB per MLP, where peft over bnb keeps
  X, gate, up, act(gate) and h (32 + 4 x 112 MiB) plus its LoRA intermediates;
- dX of several projections reading the same X (Q/K/V; gate/up) is accumulated in one buffer
  with in-place ``addmm_``; the scalings ride on the GEMMs' alpha instead of separate passes;
- the A matrices of projections reading the same X are stacked ([A_q; A_k; A_v], made with the
  cast to the compute dtype by one multi-tensor copy), so their r-wide GEMMs run as one: X A^T in
  the forward, (dZ B) A and (dZ B)^T X in the backward -- 3 GEMMs instead of 9 for Q/K/V per
  forward + backward, fewer launches and saved tensors for a host-bound step.

Matmuls are cuBLAS (``torch.mm``/``addmm``/``addmm_``); Triton runs the GLU (``nbtune/kernels/glu.py``).

Backward of one projection, with ``G = dY`` (tokens x out) and ``XA = X A^T`` (saved):

    GB   = G B                         (tokens x r)
    dX   = G W + s GB A                (tokens x in)    W dequantized again
    dB   = s G^T XA                                    (out x r)
    dA   = s GB^T X                                    (r x in)
    db   = sum_tokens G                                (only if the bias requires grad)

Backward of the MLP ``y = down(act(gate(x)) * up(x))`` with ``g = gate(x)``, ``u = up(x)``,
``h = act(g) * u`` and ``G = dY``:

    GBd   = G B_d
    dh    = G W_d + s_d GBd A_d                        (tokens x intermediate)
    dB_d  = s_d G^T HA,   HA = h A_d^T (saved in the forward)
    dg    = dh * u * act'(g),  du = dh * act(g),  h recomputed      [Triton, in place]
    dA_d  = s_d GBd^T h
    dX    = dg W_g + (s_g dg B_g) A_g + du W_u + (s_u du B_u) A_u
    dB_g  = s_g dg^T XAg,  dA_g = s_g (dg B_g)^T X     (same for up)

The scalings ride on the GEMMs' alpha (``addmm_(..., alpha=s)``): no separate scaling pass.

Dtypes: everything is computed in the compute dtype, that of x (or the autocast dtype when
autocast is on). LoRA parameters kept in fp32 next to a 16-bit base (as peft does) are cast to
it for the matmuls once per forward (the backward reuses the 16-bit copies it saved: r x (in + out)
values per projection, a few MiB per layer), and their gradients are returned in the parameter's
own dtype (on CUDA written in fp32 by the gradient GEMM itself, see ``_mm_scaled``). Frozen means
frozen: even a base whose weight requires grad gets none. LoRA dropout is not supported: callers
take this path only when dropout is 0 (``lora_parts`` refuses a layer with dropout). The fused
MLP backward may run once per forward: it overwrites its saved buffers, so a second backward
through the same graph (``retain_graph=True``) raises instead of returning wrong gradients.
"""
from __future__ import annotations

import warnings
from collections import namedtuple

import torch
import torch.nn.functional as F

from .._chunking import mlp_token_chunks
from ._backend import use_triton
from .glu import ACTIVATIONS, glu_backward_inplace, glu_forward_2d, glu_reference
from .nf4 import dequantize_base
from .nf4_matmul import MAX_TOKENS, decode_product, matmul_plan
from .offload import checkpoint_phase

LoRAProjection = namedtuple("LoRAProjection", ["base", "lora_A", "lora_B", "scaling", "bias"], defaults=(None,))
LoRAProjection.__doc__ = """One LoRA projection: base (Params4bit / Linear4bit / nn.Linear / tensor (out, in)),
lora_A (r, in), lora_B (out, r), scaling (float), bias (out,) or None."""


# ----------------------------------------------------------------------------- argument handling
def lora_parts(layer, adapter_name: str | None = None) -> LoRAProjection:
    """The (base, A, B, scaling, bias) of a peft LoRA layer (``peft.tuners.lora.Linear`` or
    ``Linear4bit``) for its single active adapter, checked to be plain LoRA without dropout.

    Also accepts a tuple/list ``(base, A, B, scaling[, bias])`` or a ``LoRAProjection``.
    Raises ValueError for what the fused path does not compute: dropout > 0, DoRA or another
    variant, a LoRA bias, merged or disabled adapters, several active adapters.
    """
    if isinstance(layer, (tuple, list)):
        return LoRAProjection(*layer)
    if not hasattr(layer, "lora_A"):
        raise TypeError(f"expected a peft LoRA layer or a (base, A, B, scaling[, bias]) tuple, got {type(layer).__name__}")
    if adapter_name is None:
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) != 1:
            raise ValueError(f"fused LoRA needs exactly one active adapter, {type(layer).__name__} has {active}")
        adapter_name = active[0]
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        raise ValueError("fused LoRA: adapters are merged or disabled on this layer; call the layer itself")
    if adapter_name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter_name, False):
        raise ValueError("fused LoRA does not support DoRA or other LoRA variants")
    if getattr(layer, "lora_bias", {}).get(adapter_name, False):
        raise ValueError("fused LoRA does not support lora_bias=True")
    dropout = layer.lora_dropout[adapter_name]
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
        raise ValueError(f"fused LoRA does not support lora_dropout > 0 (got {dropout.p})")
    base_layer = layer.get_base_layer()
    return LoRAProjection(
        base=base_layer,
        lora_A=layer.lora_A[adapter_name].weight,
        lora_B=layer.lora_B[adapter_name].weight,
        scaling=float(layer.scaling[adapter_name]),
        bias=getattr(base_layer, "bias", None),
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The dense (out, in) base weight in dtype, cut from autograd: the base is frozen here."""
    return dequantize_base(base, dtype=dtype).detach()


def _check_shapes(x: torch.Tensor, p: LoRAProjection, what: str):
    r, n_in = p.lora_A.shape
    if p.lora_B.shape[1] != r or x.shape[-1] != n_in:
        raise ValueError(
            f"{what}: x (..., {x.shape[-1]}), lora_A {tuple(p.lora_A.shape)}, lora_B {tuple(p.lora_B.shape)} "
            "do not fit (A must be (r, in), B (out, r))"
        )


def _mm_scaled(a, b, scaling, dtype=None):
    """scaling * (a @ b) in one GEMM (alpha), into a fresh tensor of ``dtype`` (default a's; beta=0: its
    contents are ignored).

    A LoRA gradient wanted in fp32 from 16-bit operands (fp32 adapters over a 16-bit compute dtype,
    peft's default) comes straight out of the GEMM's fp32 accumulator on CUDA (cuBLAS with a wide
    output: ``addmm``'s ``out_dtype``): no rounding to 16 bits and no cast kernel after it, one
    host op instead of two per gradient (448 casts per step for LoRA on a 32-layer model's seven
    projections). Elsewhere the GEMM runs in a's dtype and the result is cast.
    """
    if dtype is None or dtype == a.dtype:
        return torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device).addmm_(a, b, beta=0.0, alpha=scaling)
    if _wide_gemm_ok(a, dtype):
        out = torch.empty((a.shape[0], b.shape[1]), dtype=dtype, device=a.device)
        try:
            return torch.addmm(out, a, b, dtype, beta=0.0, alpha=scaling, out=out)
        except (RuntimeError, TypeError) as e:  # a torch / cuBLAS without the wide-output GEMM
            _WIDE_GEMM["ok"] = False
            warnings.warn(f"nbtune.kernels: fp32-output GEMM unavailable ({e}); LoRA grads are cast instead",
                          RuntimeWarning, stacklevel=2)
    return _mm_scaled(a, b, scaling).to(dtype)


# False once this torch / GPU refuses addmm's out_dtype (then the 16-bit GEMM plus a cast)
_WIDE_GEMM = {"ok": True}


def _wide_gemm_ok(a, dtype) -> bool:
    """Can cuBLAS write a (16-bit x 16-bit) GEMM straight into ``dtype``? (CUDA, fp32 out, fp16/bf16 in.)"""
    return (_WIDE_GEMM["ok"] and a.is_cuda and dtype == torch.float32
            and a.dtype in (torch.float16, torch.bfloat16))


def _base_product(X, base, out, bias=None):
    """out = X W^T (+ bias) for the frozen base W, in X's dtype. Decoding-sized inputs (at most
    MAX_TOKENS tokens) over an NF4 base multiply straight from the packed weight
    (:mod:`~nbtune.kernels.nf4_matmul`: ~9x less memory traffic than dequantizing it); everything
    else dequantizes W for one cuBLAS GEMM."""
    plan = matmul_plan(base, X.dtype, X.device) if X.shape[0] <= MAX_TOKENS and X.stride(1) == 1 else None
    if plan is not None:
        decode_product(X, plan, out)
        if bias is not None:
            out.add_(bias)
        return out
    W = _weight(base, X.dtype)
    if bias is None:
        return torch.mm(X, W.t(), out=out)
    return torch.addmm(bias, X, W.t(), out=out)


def _project(X, base, A, B, scaling, bias, lead_shape=None, out=None):
    """(Y, XA): Y = X W^T (+ bias) + s XA B^T with XA = X A^T and W the base's weight; all in X's dtype.

    With ``lead_shape`` Y is allocated as (*lead_shape, out) and the GEMMs write through a 2-D view
    of it, so the caller can return Y itself rather than a view: RoPE can then work in place on the
    projections' outputs (autograd forbids in-place writes to views of a custom Function's output).
    With ``out`` (a contiguous 2-D (tokens, out) buffer) the GEMMs write there and Y is ``out``.
    """
    XA = torch.mm(X, A.t())
    return _project_with_xa(X, base, XA, B, scaling, bias, lead_shape, out), XA


def _project_with_xa(X, base, XA, B, scaling, bias, lead_shape=None, out=None):
    """Y = X W^T (+ bias) + s XA B^T for a given XA = X A^T (``_project``'s output allocation)."""
    n_out = B.shape[0]
    if out is None:
        Y = torch.empty(*(lead_shape if lead_shape is not None else X.shape[:1]), n_out, device=X.device, dtype=X.dtype)
    else:
        Y = out
    Y2 = Y.view(-1, n_out)
    _base_product(X, base, Y2, bias)
    Y2.addmm_(XA, B.t(), alpha=scaling)
    return Y


def _cast_group(As, others, dtype):
    """(A_all, others_c): the A matrices of projections sharing one input stacked into one
    (sum r, in) tensor, and ``others`` (B matrices, ...) alongside, all in ``dtype``: one buffer,
    filled by one multi-tensor copy (which also casts fp32 adapters to the compute dtype), instead
    of a cast per tensor. ``A_all`` lets the r-wide GEMMs of the group run as one: X A_all^T in
    the forward, (dZ B)_all A_all and (dZ B)_all^T X in the backward."""
    tensors = [*As, *others]
    if all(t.dtype == dtype for t in tensors):  # nothing to cast: stack the As only
        return (As[0] if len(As) == 1 else torch.cat(As)), list(others)
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=As[0].device)
    views = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    torch._foreach_copy_(views, tensors)
    return flat[: sum(a.numel() for a in As)].view(-1, As[0].shape[1]), views[len(As):]


def _spans(Bs):
    """The (start, stop) rows of each projection's A in the stacked A_all (its rank r = B.shape[1])."""
    spans, start = [], 0
    for B in Bs:
        spans.append((start, start + B.shape[1]))
        start += B.shape[1]
    return spans


def _project_group(X, bases, A_all, Bs, scalings, biases, lead_shape=None):
    """([Y_i], XA_all): Y_i = X W_i^T (+ b_i) + s_i (X A_i^T) B_i^T with one X A_all^T GEMM for the
    group (its columns are the X A_i^T); each dense W_i exists only for its own GEMM."""
    XA_all = torch.mm(X, A_all.t())
    outs = []
    for (a, b), base, B, s, bias in zip(_spans(Bs), bases, Bs, scalings, biases):
        outs.append(_project_with_xa(X, base, XA_all[:, a:b], B, s, bias, lead_shape))
    return outs, XA_all


def _cast(t, dtype):
    """t in dtype (itself when it already is; None stays None). fp32 LoRA weights are cast once per
    forward and recompute, and the casts are saved for the backward. Keeping 16-bit copies on the
    parameters across the step would save the recompute's cast, but they live through the whole
    backward: +84 MiB of peak at r=16 on llama3-8b (llama2-7b 1x2048 fp16 measured 4.68 GiB with
    them, against the 4.6 GiB bar)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _in_dtypes(grads, dtypes):
    """Each grad in its parameter's dtype (None stays None)."""
    return tuple(None if g is None else g.to(d) for g, d in zip(grads, dtypes))


# ----------------------------------------------------------------------------- projections sharing X
class _LoRAProjections(torch.autograd.Function):
    """Y_i = X W_i^T (+ b_i) + s_i (X A_i^T) B_i^T for projections i sharing one input X.

    apply(x, scalings, base_0, A_0, B_0, bias_0, base_1, ...) -> (Y_0, Y_1, ...).
    Saves X, each X A_i^T and the compute-dtype A_i, B_i (saved tensors, so that a checkpointed
    forward keeps none of them); dX of all projections accumulates into one buffer.
    """

    @staticmethod
    def forward(ctx, x, scalings, *flat):
        dtype = _compute_dtype(x)
        n_in = x.shape[-1]
        X = _cast(x.reshape(-1, n_in), dtype)
        n = len(scalings)
        bases, As, Bs, biases = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        A_all, Bs_c = _cast_group(As, Bs, dtype)
        outputs, XA_all = _project_group(X, bases, A_all, Bs_c, scalings,
                                         [_cast(b, dtype) for b in biases], lead_shape=x.shape[:-1])
        ctx.save_for_backward(X, XA_all, A_all, *Bs_c)  # cast once: the backward reuses them
        ctx.bases = bases
        ctx.grad_dtypes = [(As[i].dtype, Bs[i].dtype, None if biases[i] is None else biases[i].dtype)
                           for i in range(n)]
        ctx.scalings, ctx.dtype, ctx.x_shape, ctx.x_dtype = scalings, dtype, x.shape, x.dtype
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        X, XA_all, A_all, *Bs = ctx.saved_tensors
        dtype = ctx.dtype
        dZs = [_cast(g.reshape(-1, g.shape[-1]), dtype) for g in grads]
        needs = [ctx.needs_input_grad[2 + 4 * i + 1: 2 + 4 * i + 4] for i in range(len(Bs))]
        dX, lora_grads = _backward_through_projections(
            dZs, X, XA_all, ctx.bases, A_all, Bs, ctx.scalings, dtype,
            ctx.needs_input_grad[0], needs, [d[:2] for d in ctx.grad_dtypes])
        flat_grads = []
        for grads_i, dtypes_i in zip(lora_grads, ctx.grad_dtypes):
            flat_grads += [None, *_in_dtypes(grads_i, dtypes_i)]
        if dX is not None:
            dX = _cast(dX.view(ctx.x_shape), ctx.x_dtype)
        return (dX, None, *flat_grads)


def _backward_through_projections(dZs, X, XA_all, bases, A_all, Bs, scalings, dtype, need_x, needs, grad_dtypes,
                                  dX=None):
    """Backward of projections i sharing the input X, given dZ_i = dL/dY_i (compute dtype), their A
    matrices stacked in ``A_all`` (``_cast_group``) and ``XA_all = X A_all^T`` (saved):

        GB_all = [dZ_0 B_0 | dZ_1 B_1 | ...]            (tokens x sum r; kept transposed)
        dX     = sum_i dZ_i W_i + s GB_all A_all        (W_i dequantized again, one at a time)
        dA_all = s GB_all^T X,  dB_i = s_i dZ_i^T XA_i,  dbias_i = sum_tokens dZ_i

    With one scaling s for the whole group (peft's usual case) the group's r-wide GEMMs run as
    one each; with different scalings they run per projection. ``needs[i]`` = (need_A, need_B,
    need_bias); ``grad_dtypes[i]`` = the dtypes wanted for (dA_i, dB_i) (``_mm_scaled``); dA_i
    are row blocks of one dA_all when it is computed whole. dX is accumulated in one buffer: a
    fresh one, or ``dX`` (a contiguous 2-D buffer, overwritten) when given. Returns (dX or None,
    [(dA, dB, dbias) per projection, each None when not needed]); dbias in the compute dtype.
    """
    spans = _spans(Bs)
    shared_s = all(s == scalings[0] for s in scalings)
    need_As = [nd[0] for nd in needs]
    GBt = None
    if need_x or any(need_As):
        GBt = torch.empty((A_all.shape[0], X.shape[0]), dtype=dtype, device=X.device)
        for (a, b), dZ, B in zip(spans, dZs, Bs):
            torch.mm(B.t(), dZ.t(), out=GBt[a:b])
    if need_x:
        for i, (dZ, base) in enumerate(zip(dZs, bases)):
            W = _weight(base, dtype)
            if i:
                dX.addmm_(dZ, W)
            elif dX is None:
                dX = torch.mm(dZ, W)
            else:
                torch.mm(dZ, W, out=dX)
            del W
        if shared_s:
            dX.addmm_(GBt.t(), A_all, alpha=scalings[0])
        else:
            for (a, b), s in zip(spans, scalings):
                dX.addmm_(GBt[a:b].t(), A_all[a:b], alpha=s)
    grad_As = [None] * len(Bs)
    if all(need_As) and shared_s and len({d[0] for d in grad_dtypes}) == 1:
        dA_all = _mm_scaled(GBt, X, scalings[0], grad_dtypes[0][0])
        grad_As = [dA_all[a:b] for a, b in spans]
    else:
        for i, ((a, b), s, need_A, (dtype_A, _)) in enumerate(zip(spans, scalings, need_As, grad_dtypes)):
            if need_A:
                grad_As[i] = _mm_scaled(GBt[a:b], X, s, dtype_A)
    grads = []
    for (a, b), dZ, s, grad_A, (_, need_B, need_bias), (_, dtype_B) in zip(
            spans, dZs, scalings, grad_As, needs, grad_dtypes):
        grad_B = _mm_scaled(dZ.t(), XA_all[:, a:b], s, dtype_B) if need_B else None
        grad_bias = dZ.sum(0) if need_bias else None
        grads.append((grad_A, grad_B, grad_bias))
    return (dX if need_x else None), grads


def _apply_projections(x, projections):
    scalings = tuple(float(p.scaling) for p in projections)
    flat = []
    for p in projections:
        flat += [p.base, p.lora_A, p.lora_B, p.bias]
    return _LoRAProjections.apply(x, scalings, *flat)


def _down_and_glu_backward(G, g, u, HA, base, A, B, s, activation, dtype, needs, grad_dtypes):
    """Backward of ``y = down(h)``, ``h = act(g) * u`` down to dg, du, given G = dL/dy:

        dh   = G W_d + s (G B_d) A_d
        dB_d = s G^T HA,  HA = h A_d^T (``HA`` saved, or None: made here from the recomputed h)
        dg   = dh * u * act'(g),  du = dh * act(g)        [Triton, in place: g <- dg, u <- du, dh <- h]
        dA_d = s (G B_d)^T h,  dbias_d = sum_tokens G

    ``needs`` = (need_A, need_B, need_bias) of the down projection, ``grad_dtypes`` the dtypes wanted
    for (dA_d, dB_d). Returns (dg, du, (dA_d, dB_d, dbias_d)), None where not needed; dbias_d in the
    compute dtype.
    """
    need_A, need_B, need_bias = needs
    dtype_A, dtype_B = grad_dtypes
    GB = torch.mm(G, B)
    W = _weight(base, dtype)
    dh = torch.mm(G, W)
    del W
    dh.addmm_(GB, A, alpha=s)
    grad_B = _mm_scaled(G.t(), HA, s, dtype_B) if need_B and HA is not None else None
    grad_bias = G.sum(0) if need_bias else None
    dg, du, h = glu_backward_inplace(dh, g, u, activation, store_h=need_A or (need_B and HA is None))
    if need_B and HA is None:
        grad_B = _mm_scaled(G.t(), torch.mm(h, A.t()), s, dtype_B)
    grad_A = _mm_scaled(GB.t(), h, s, dtype_A) if need_A else None
    return dg, du, (grad_A, grad_B, grad_bias)


# ----------------------------------------------------------------------------- MLP
class _LoRAMLP(torch.autograd.Function):
    """y = down(act(gate(x)) * up(x)), each of gate/up/down a LoRA projection; see module docstring.

    apply(x, activation_id, (s_g, s_u, s_d), gate base, A, B, bias, up ..., down ...) -> y.
    Saves X, g, u and the three r-wide X A^T / h A_d^T; not h, not any dequantized W.
    """

    @staticmethod
    def forward(ctx, x, activation, scalings, *flat):
        dtype = _compute_dtype(x)
        X = _cast(x.reshape(-1, x.shape[-1]), dtype)
        (gate_base, gate_A, gate_B, gate_bias, up_base, up_A, up_B, up_bias,
         down_base, down_A, down_B, down_bias) = flat
        s_g, s_u, s_d = scalings

        A_gu, loras = _mlp_loras(flat, dtype)
        gate_Bc, up_Bc, down_Ac, down_Bc = loras
        (g, u), XA_gu = _project_group(X, (gate_base, up_base), A_gu, (gate_Bc, up_Bc),
                                       (s_g, s_u), (_cast(gate_bias, dtype), _cast(up_bias, dtype)))
        h = glu_forward_2d(g, u, activation)
        y, HAd = _project(h, down_base, down_Ac, down_Bc, s_d, _cast(down_bias, dtype), lead_shape=x.shape[:-1])
        del h

        ctx.save_for_backward(X, g, u, XA_gu, HAd, A_gu, *loras)
        ctx.grad_dtypes = _mlp_grad_dtypes(flat)
        ctx.bases = (gate_base, up_base, down_base)
        ctx.activation, ctx.scalings, ctx.dtype = activation, scalings, dtype
        ctx.consumed = False
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.consumed:  # the Triton kernel below overwrites g and u without bumping their versions
            raise RuntimeError(
                "lora_mlp: backward through the fused LoRA MLP a second time (retain_graph=True): its saved "
                "gate/up buffers were overwritten in place by the first backward. Run the forward again."
            )
        ctx.consumed = True
        X, g, u, XA_gu, HAd, A_gu, gate_B, up_B, down_A, down_B = ctx.saved_tensors
        gate_base, up_base, down_base = ctx.bases
        s_g, s_u, s_d = ctx.scalings
        dtype = ctx.dtype
        need_x, need_gate, need_up, need_down = _mlp_needs(ctx)

        G = _cast(dy.reshape(-1, dy.shape[-1]), dtype)
        gd = ctx.grad_dtypes
        dg, du, down_grads = _down_and_glu_backward(
            G, g, u, HAd, down_base, down_A, down_B, s_d, ctx.activation, dtype, need_down, gd[6:8])
        # gate and up projections: dX accumulates in one buffer
        dX, (gate_grads, up_grads) = _backward_through_projections(
            (dg, du), X, XA_gu, (gate_base, up_base), A_gu, (gate_B, up_B), (s_g, s_u), dtype,
            need_x, (need_gate, need_up), (gd[0:2], gd[3:5]))
        if dX is not None:
            dX = _cast(dX.view(ctx.x_shape), ctx.x_dtype)
        return _mlp_input_grads(dX, _in_dtypes((*gate_grads, *up_grads, *down_grads), ctx.grad_dtypes))


def _mlp_loras(flat, dtype):
    """(A_gu, (gate_B, up_B, down_A, down_B)) in ``dtype`` from the MLP Functions' flat arguments
    (base, A, B, bias per projection: gate, up, down): [gate_A; up_A] stacked (they share X), all
    cast by one multi-tensor copy (``_cast_group``)."""
    _, gate_A, gate_B, _, _, up_A, up_B, _, _, down_A, down_B, _ = flat
    return _cast_group((gate_A, up_A), (gate_B, up_B, down_A, down_B), dtype)


def _mlp_grad_dtypes(flat):
    """The dtypes of the 9 trainable inputs (A, B, bias of gate, up, down) in the MLP Functions' flat
    arguments (base, A, B, bias per projection); None for an absent bias."""
    return [None if t is None else t.dtype for i in range(3) for t in flat[4 * i + 1: 4 * i + 4]]


def _mlp_needs(ctx):
    """(need_x, gate's, up's and down's (need_A, need_B, need_bias)) of the MLP Functions, whose inputs
    are (x, activation, scalings, then base, A, B, bias for gate (3..6), up (7..10), down (11..14))."""
    need = ctx.needs_input_grad
    return need[0], need[4:7], need[8:11], need[12:15]


def _mlp_input_grads(dX, lora_grads):
    """The MLP Functions' backward result for apply(x, activation, scalings, gate base, A, B, bias,
    up ..., down ...): ``lora_grads`` are the 9 grads (A, B, bias of gate, up, down); none for the
    activation, the scalings and the frozen bases."""
    g = lora_grads
    return (dX, None, None, None, *g[0:3], None, *g[3:6], None, *g[6:9])


# ----------------------------------------------------------------------------- MLP as a checkpointed tail
class _GradSums:
    """LoRA grads summed over token chunks: one chunk keeps its grad as it comes (in the
    parameter's dtype, or the compute dtype), several add into fp32 (r x features each: small), so
    chunking adds no rounding of its own."""

    def __init__(self, n: int, chunks: int):
        self.sums, self.fp32 = [None] * n, chunks > 1

    def add(self, i: int, grad):
        if grad is None:
            return
        if self.sums[i] is None:
            self.sums[i] = grad.float() if self.fp32 else grad
        else:
            self.sums[i].add_(grad)


class _LoRAMLPCheckpointed(torch.autograd.Function):
    """The LoRA MLP as the last op of a checkpointed layer (``lora_mlp(checkpointed_tail=True)``).

    Same math as ``_LoRAMLP``; different schedule. Under checkpointing a layer's forward runs twice
    (the forward, keeping nothing, and the recompute inside the backward, whose *outputs* are thrown
    away: only its saved tensors are used). So:

    - forward pass: y computed token chunk by token chunk (``mlp_token_chunks``), saving X only;
    - recompute pass (``checkpoint_phase().name == "recompute"``): nothing computed; y is returned
      unfilled (the caller only adds it to the residual stream, which nothing reads in the
      recompute) and X is saved again: the down-projection GEMM of the recompute is never run
      (~8% of a llama3-8b step's FLOPs);
    - backward, per token chunk c, with G_c = dL/dy_c:

        g_c, u_c = X_c W_g^T + s_g (X_c A_g^T) B_g^T, ...           (what the recompute would have done)
        dh_c = G_c W_d + s_d (G_c B_d) A_d;  dg_c, du_c, h_c by the GLU backward kernel (in place)
        dB_d += s_d G_c^T (h_c A_d^T);  dA_d += s_d (G_c B_d)^T h_c
        dX_c = dg_c W_g + s_g (dg_c B_g) A_g + du_c W_u + s_u (du_c B_u) A_u
        dA_g += s_g (dg_c B_g)^T X_c;  dB_g += s_g dg_c^T (X_c A_g^T)   (same for up)

    so the (tokens x intermediate) buffers g, u, dh exist one chunk at a time: at 48k tokens on
    llama3-8b that is ~0.4 GiB instead of ~4 GiB. Each base weight is dequantized for one GEMM at
    a time (5 dequantizations per backward instead of the 6 of recompute + backward).

    apply(x, activation_id, (s_g, s_u, s_d), gate base, A, B, bias, up ..., down ...) -> y.
    """

    @staticmethod
    def forward(ctx, x, activation, scalings, *flat):
        dtype = _compute_dtype(x)
        X = _cast(x.reshape(-1, x.shape[-1]), dtype)
        bases, biases = flat[0::4], [_cast(b, dtype) for b in flat[3::4]]
        A_gu, loras = _mlp_loras(flat, dtype)
        n_out = loras[3].shape[0]
        y = torch.empty(*x.shape[:-1], n_out, device=x.device, dtype=dtype)
        phase = checkpoint_phase()
        if phase is None or phase.name != "recompute":
            y2 = y.view(-1, n_out)
            (s_g, s_u, s_d), (gB, uB, dA, dB) = scalings, loras
            for a, b in mlp_token_chunks(X.shape[0], gB.shape[0], X.element_size()):
                X_c = X[a:b]
                (g, u), _ = _project_group(X_c, bases[:2], A_gu, (gB, uB), (s_g, s_u), biases[:2])
                h = glu_forward_2d(g, u, activation)
                del g, u
                _project(h, bases[2], dA, dB, s_d, biases[2], out=y2[a:b])
                del h
        ctx.save_for_backward(X, A_gu, *loras)
        ctx.grad_dtypes = _mlp_grad_dtypes(flat)
        ctx.bases, ctx.biases = bases, biases
        ctx.activation, ctx.scalings, ctx.dtype = activation, scalings, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        X, A_gu, gB, uB, dA, dB = ctx.saved_tensors
        gate_base, up_base, down_base = ctx.bases
        s_g, s_u, s_d = ctx.scalings
        dtype = ctx.dtype
        need_x, need_gate, need_up, need_down = _mlp_needs(ctx)
        G = _cast(dy.reshape(-1, dy.shape[-1]), dtype)
        dX = torch.empty_like(X) if need_x else None
        chunks = mlp_token_chunks(X.shape[0], gB.shape[0], X.element_size())
        gd = ctx.grad_dtypes
        sums = _GradSums(9, len(chunks))  # gate A, B, bias, up A, B, bias, down A, B, bias
        for a, b in chunks:
            X_c, G_c = X[a:b], G[a:b]
            (g, u), XA_gu = _project_group(X_c, (gate_base, up_base), A_gu, (gB, uB), (s_g, s_u), ctx.biases[:2])
            dg, du, down_grads = _down_and_glu_backward(
                G_c, g, u, None, down_base, dA, dB, s_d, ctx.activation, dtype, need_down, gd[6:8])
            _, (gate_grads, up_grads) = _backward_through_projections(
                (dg, du), X_c, XA_gu, (gate_base, up_base), A_gu, (gB, uB), (s_g, s_u), dtype,
                need_x, (need_gate, need_up), (gd[0:2], gd[3:5]), dX=None if dX is None else dX[a:b])
            del g, u, dg, du, XA_gu
            for k, grad in enumerate((*gate_grads, *up_grads, *down_grads)):
                sums.add(k, grad)
        if dX is not None:
            dX = _cast(dX.view(ctx.x_shape), ctx.x_dtype)
        return _mlp_input_grads(dX, _in_dtypes(sums.sums, ctx.grad_dtypes))


# ----------------------------------------------------------------------------- references
def _lora_fp32(x32: torch.Tensor, p: LoRAProjection) -> torch.Tensor:
    """x W^T (+b) + s (x A^T) B^T in fp32 (x32 already fp32); autograd flows to x, A, B, bias only."""
    W = _weight(p.base, torch.float32).float()
    bias = None if p.bias is None else p.bias.float()
    return F.linear(x32, W, bias) + p.scaling * F.linear(F.linear(x32, p.lora_A.float()), p.lora_B.float())


def lora_linear_reference(x, base, lora_A, lora_B, scaling, bias=None):
    """Plain-torch LoRA linear: dequantize, F.linear, in fp32; returns x's dtype."""
    return _lora_fp32(x.float(), LoRAProjection(base, lora_A, lora_B, float(scaling), bias)).to(x.dtype)


def lora_qkv_reference(x, q, k, v):
    x32 = x.float()
    return tuple(_lora_fp32(x32, lora_parts(p)).to(x.dtype) for p in (q, k, v))


def lora_mlp_reference(x, gate, up, down, activation: str = "swiglu"):
    """down(act(gate(x)) * up(x)) in fp32 throughout (no rounding between the steps); x's dtype out."""
    act = _activation_id(activation)
    x32 = x.float()
    g = _lora_fp32(x32, lora_parts(gate))
    u = _lora_fp32(x32, lora_parts(up))
    return _lora_fp32(glu_reference(g, u, act), lora_parts(down)).to(x.dtype)


def _activation_id(activation: str) -> int:
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}") from None


# ----------------------------------------------------------------------------- public
def lora_linear(x, base, lora_A, lora_B, scaling, bias=None):
    """y = x W^T (+ bias) + scaling * (x A^T) B^T; x (..., in), A (r, in), B (out, r) -> (..., out).

    base: bnb Params4bit / Linear4bit, nn.Linear or an (out, in) tensor; frozen (no grad).
    """
    p = LoRAProjection(base, lora_A, lora_B, float(scaling), bias)
    _check_shapes(x, p, "lora_linear")
    if use_triton(x, lora_A, lora_B):
        return _apply_projections(x, [p])[0]
    return lora_linear_reference(x, base, lora_A, lora_B, scaling, bias)


def lora_qkv(x, q, k, v):
    """(Q, K, V) LoRA projections of the same x; each of q/k/v is (base, A, B, scaling[, bias]),
    a LoRAProjection or a peft LoRA layer. K/V may be narrower than Q (GQA)."""
    projections = [lora_parts(p) for p in (q, k, v)]
    for name, p in zip("qkv", projections):
        _check_shapes(x, p, f"lora_qkv ({name})")
    if use_triton(x, *[t for p in projections for t in (p.lora_A, p.lora_B)]):
        return _apply_projections(x, projections)
    return lora_qkv_reference(x, *projections)


def lora_mlp(x, gate, up, down, activation: str = "swiglu", *, checkpointed_tail: bool = False):
    """down(act(gate(x)) * up(x)) with LoRA on all three projections (Llama/Mistral/Qwen: swiglu,
    Gemma: geglu_tanh). gate/up/down: (base, A, B, scaling[, bias]), LoRAProjection or peft layers.

    ``checkpointed_tail=True`` is the caller's promise that this call is the last op of a function
    run under ``offloaded_checkpoint`` (torch's non-reentrant checkpoint) and that its output is only
    added to the residual stream (no norm or other op saves it for a backward): the fused path then
    skips the MLP in the recompute and rebuilds gate/up inside the backward, token chunk by token
    chunk (``_LoRAMLPCheckpointed``). Outside a checkpoint it is the same math with X alone saved."""
    act = _activation_id(activation)
    gate, up, down = (lora_parts(p) for p in (gate, up, down))
    _check_shapes(x, gate, "lora_mlp (gate)")
    _check_shapes(x, up, "lora_mlp (up)")
    if down.lora_A.shape[1] != gate.lora_B.shape[0] or up.lora_B.shape[0] != gate.lora_B.shape[0]:
        raise ValueError("lora_mlp: gate/up out features must equal down in features")
    if use_triton(x, gate.lora_A, up.lora_A, down.lora_A):
        flat = [t for p in (gate, up, down) for t in (p.base, p.lora_A, p.lora_B, p.bias)]
        function = _LoRAMLPCheckpointed if checkpointed_tail else _LoRAMLP
        return function.apply(x, act, (gate.scaling, up.scaling, down.scaling), *flat)
    return lora_mlp_reference(x, gate, up, down, activation)


def compile_specs():
    """No @triton.jit function lives here: the MLP's GLU kernels are compiled with nbtune/kernels/glu.py."""
    return []
