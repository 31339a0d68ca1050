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
  with in-place ``addmm_``; the scalings ride on the GEMMs' alpha instead of separate passes.

Matmuls are cuBLAS (``torch.mm``/``addmm``/``addmm_``); Triton runs the GLU (``kernels/glu.py``).

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
own dtype. Frozen means
frozen: even a base whose weight requires grad gets none. LoRA dropout is not supported: callers
take this path only when dropout is 0 (``lora_parts`` refuses a layer with dropout). The fused
MLP backward may run once per forward: it overwrites its saved buffers, so a second backward
through the same graph (``retain_graph=True``) raises instead of returning wrong gradients.
"""
from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F

from ._backend import use_triton
from .glu import ACTIVATIONS, glu_backward_inplace, glu_forward_2d, glu_reference
from .nf4 import dequantize_base

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


def _mm_scaled(a, b, scaling):
    """scaling * (a @ b) in one GEMM (alpha), into a fresh tensor (beta=0: its contents are ignored)."""
    return torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device).addmm_(a, b, beta=0.0, alpha=scaling)


def _project(X, W, A, B, scaling, bias, lead_shape=None):
    """(Y, XA): Y = X W^T (+ bias) + s XA B^T with XA = X A^T; all in X's dtype.

    With ``lead_shape`` Y is allocated as (*lead_shape, out) and the GEMMs write through a 2-D view
    of it, so the caller can return Y itself rather than a view: RoPE can then work in place on the
    projections' outputs (autograd forbids in-place writes to views of a custom Function's output).
    """
    XA = torch.mm(X, A.t())
    n_out = W.shape[0]
    Y = torch.empty(*(lead_shape if lead_shape is not None else X.shape[:1]), n_out, device=X.device, dtype=X.dtype)
    Y2 = Y.view(-1, n_out)
    if bias is None:
        torch.mm(X, W.t(), out=Y2)
    else:
        torch.addmm(bias, X, W.t(), out=Y2)
    Y2.addmm_(XA, B.t(), alpha=scaling)
    return Y, XA


def _cast(t, dtype):
    """t in dtype (itself when it already is; None stays None). fp32 LoRA weights are cast once per
    forward and recompute, and the casts are saved for the backward. Keeping 16-bit copies on the
    parameters across the step would save the recompute's cast, but they live through the whole
    backward: +84 MiB of peak at r=16 on llama3-8b (llama2-7b 1x2048 fp16 measured 4.68 GiB with
    them, against the 4.6 GiB bar)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


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
        outputs, saved_xa, saved_params, grad_dtypes = [], [], [], []
        for i, s in enumerate(scalings):
            base, A, B, bias = flat[4 * i: 4 * i + 4]
            A_c, B_c = _cast(A, dtype), _cast(B, dtype)
            W = _weight(base, dtype)
            Y, XA = _project(X, W, A_c, B_c, s, _cast(bias, dtype), lead_shape=x.shape[:-1])
            del W
            outputs.append(Y)
            saved_xa.append(XA)
            saved_params += [A_c, B_c]
            grad_dtypes.append((A.dtype, B.dtype, None if bias is None else bias.dtype))
        ctx.save_for_backward(X, *saved_xa, *saved_params)  # cast once: the backward reuses them
        ctx.bases = [flat[4 * i] for i in range(len(scalings))]
        ctx.grad_dtypes = grad_dtypes
        ctx.scalings, ctx.dtype, ctx.x_shape, ctx.x_dtype = scalings, dtype, x.shape, x.dtype
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.scalings)
        saved = ctx.saved_tensors
        X, saved_xa, params = saved[0], saved[1: 1 + n], saved[1 + n:]
        dtype = ctx.dtype
        need_x = ctx.needs_input_grad[0]
        dX = None
        flat_grads = []
        for i, s in enumerate(ctx.scalings):
            A_c, B_c = params[2 * i: 2 * i + 2]
            A_dtype, B_dtype, bias_dtype = ctx.grad_dtypes[i]
            need_A, need_B, need_bias = ctx.needs_input_grad[2 + 4 * i + 1: 2 + 4 * i + 4]
            G = _cast(grads[i].reshape(-1, grads[i].shape[-1]), dtype)
            dA = dB = dbias = None
            if need_x or need_A:
                GB = torch.mm(G, B_c)
                if need_x:
                    W = _weight(ctx.bases[i], dtype)
                    if dX is None:
                        dX = torch.mm(G, W)
                    else:
                        dX.addmm_(G, W)
                    del W
                    dX.addmm_(GB, A_c, alpha=s)
                if need_A:
                    dA = _mm_scaled(GB.t(), X, s).to(A_dtype)
            if need_B:
                dB = _mm_scaled(G.t(), saved_xa[i], s).to(B_dtype)
            if need_bias:
                dbias = G.sum(0).to(bias_dtype)
            flat_grads += [None, dA, dB, dbias]
        if dX is not None:
            dX = _cast(dX.view(ctx.x_shape), ctx.x_dtype)
        return (dX, None, *flat_grads)


def _apply_projections(x, projections):
    scalings = tuple(float(p.scaling) for p in projections)
    flat = []
    for p in projections:
        flat += [p.base, p.lora_A, p.lora_B, p.bias]
    return _LoRAProjections.apply(x, scalings, *flat)


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

        loras = [_cast(t, dtype) for t in (gate_A, gate_B, up_A, up_B, down_A, down_B)]
        gate_Ac, gate_Bc, up_Ac, up_Bc, down_Ac, down_Bc = loras
        W = _weight(gate_base, dtype)
        g, XAg = _project(X, W, gate_Ac, gate_Bc, s_g, _cast(gate_bias, dtype))
        W = _weight(up_base, dtype)
        u, XAu = _project(X, W, up_Ac, up_Bc, s_u, _cast(up_bias, dtype))
        del W
        h = glu_forward_2d(g, u, activation)
        W = _weight(down_base, dtype)
        y, HAd = _project(h, W, down_Ac, down_Bc, s_d, _cast(down_bias, dtype), lead_shape=x.shape[:-1])
        del W, h

        ctx.save_for_backward(X, g, u, XAg, XAu, HAd, *loras)
        ctx.grad_dtypes = [None if t is None else t.dtype for t in
                           (gate_A, gate_B, gate_bias, up_A, up_B, up_bias, down_A, down_B, down_bias)]
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
        X, g, u, XAg, XAu, HAd, gate_A, gate_B, up_A, up_B, down_A, down_B = ctx.saved_tensors
        (gA_dtype, gB_dtype, gbias_dtype, uA_dtype, uB_dtype, ubias_dtype,
         dA_dtype, dB_dtype, dbias_dtype) = ctx.grad_dtypes
        gate_base, up_base, down_base = ctx.bases
        s_g, s_u, s_d = ctx.scalings
        dtype = ctx.dtype
        need = ctx.needs_input_grad
        need_x = need[0]
        # flat inputs start at index 3: gate (3..6), up (7..10), down (11..14); 4 each: base, A, B, bias
        need_gA, need_gB, need_gbias = need[4:7]
        need_uA, need_uB, need_ubias = need[8:11]
        need_dA, need_dB, need_dbias = need[12:15]

        G = _cast(dy.reshape(-1, dy.shape[-1]), dtype)
        # down projection: dh = G W_d + (s_d G B_d) A_d, its LoRA grads
        GBd = torch.mm(G, down_B)
        W = _weight(down_base, dtype)
        dh = torch.mm(G, W)
        del W
        dh.addmm_(GBd, down_A, alpha=s_d)
        grad_down_B = _mm_scaled(G.t(), HAd, s_d).to(dB_dtype) if need_dB else None
        grad_down_bias = G.sum(0).to(dbias_dtype) if need_dbias else None

        # GLU backward in place: g <- dg, u <- du, dh <- h (recomputed, for dA_d)
        dg, du, h = glu_backward_inplace(dh, g, u, ctx.activation, store_h=need_dA)
        grad_down_A = _mm_scaled(GBd.t(), h, s_d).to(dA_dtype) if need_dA else None
        del h, dh

        # gate and up projections: dX accumulates in one buffer
        dX = None
        grads = []
        for dZ, base, A, B, XA, s, need_A, need_B, need_bias, dtypes in (
            (dg, gate_base, gate_A, gate_B, XAg, s_g, need_gA, need_gB, need_gbias, (gA_dtype, gB_dtype, gbias_dtype)),
            (du, up_base, up_A, up_B, XAu, s_u, need_uA, need_uB, need_ubias, (uA_dtype, uB_dtype, ubias_dtype)),
        ):
            grad_A = grad_B = grad_bias = None
            if need_x or need_A:
                GB = torch.mm(dZ, B)
                if need_x:
                    W = _weight(base, dtype)
                    if dX is None:
                        dX = torch.mm(dZ, W)
                    else:
                        dX.addmm_(dZ, W)
                    del W
                    dX.addmm_(GB, A, alpha=s)
                if need_A:
                    grad_A = _mm_scaled(GB.t(), X, s).to(dtypes[0])
            if need_B:
                grad_B = _mm_scaled(dZ.t(), XA, s).to(dtypes[1])
            if need_bias:
                grad_bias = dZ.sum(0).to(dtypes[2])
            grads += [None, grad_A, grad_B, grad_bias]
        if dX is not None:
            dX = _cast(dX.view(ctx.x_shape), ctx.x_dtype)
        return (dX, None, None, *grads, None, grad_down_A, grad_down_B, grad_down_bias)


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


def lora_mlp(x, gate, up, down, activation: str = "swiglu"):
    """down(act(gate(x)) * up(x)) with LoRA on all three projections (Llama/Mistral/Qwen: swiglu,
    Gemma: geglu_tanh). gate/up/down: (base, A, B, scaling[, bias]), LoRAProjection or peft layers."""
    act = _activation_id(activation)
    gate, up, down = (lora_parts(p) for p in (gate, up, down))
    _check_shapes(x, gate, "lora_mlp (gate)")
    _check_shapes(x, up, "lora_mlp (up)")
    if down.lora_A.shape[1] != gate.lora_B.shape[0] or up.lora_B.shape[0] != gate.lora_B.shape[0]:
        raise ValueError("lora_mlp: gate/up out features must equal down in features")
    if use_triton(x, gate.lora_A, up.lora_A, down.lora_A):
        flat = [t for p in (gate, up, down) for t in (p.base, p.lora_A, p.lora_B, p.bias)]
        return _LoRAMLP.apply(x, act, (gate.scaling, up.scaling, down.scaling), *flat)
    return lora_mlp_reference(x, gate, up, down, activation)


def compile_specs():
    """No @triton.jit function lives here: the MLP's GLU kernels are compiled with kernels/glu.py."""
    return []
