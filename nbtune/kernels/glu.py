"""Gated linear units: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up`` (exact or tanh).

What it fuses. Eager torch runs ``act(gate)`` and the product as two kernels and autograd keeps
``gate``, ``up`` *and* ``act(gate)`` for the backward. Here one Triton kernel reads ``gate`` and
``up`` once and writes ``h``; the backward kernel reads ``dh, gate, up`` once, recomputes the
activation from ``gate`` in registers and writes ``dgate`` and ``dup``. Only ``gate`` and ``up``
are saved: one (tokens x intermediate) tensor less than eager, and three elementwise passes less.

Backward math, with ``h = act(g) * u`` and ``dh`` the incoming gradient:

    dup   = dh * act(g)
    dgate = dh * u * act'(g)

    silu(g)      = g * sigmoid(g)
    silu'(g)     = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    gelu(g)      = g * Phi(g) = 0.5 * g * (1 + erf(g / sqrt 2))
    gelu'(g)     = Phi(g) + g * phi(g),               phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
    gelu_tanh(g) = 0.5 * g * (1 + tanh(z)) = g * sigmoid(2 z),   z = k (g + c g^3),
                   k = sqrt(2 / pi), c = 0.044715
    gelu_tanh'(g)= sigmoid(2z) + 2 g sigmoid(2z) (1 - sigmoid(2z)) k (1 + 3 c g^2)

(``1 + tanh(z) = 2 sigmoid(2z)``, so the tanh form needs no tanh intrinsic: it runs the same in
the interpreter and on every GPU target.)

The LoRA MLP (``nbtune/kernels/lora.py``) uses two internal helpers that save memory further:
``glu_forward_2d`` writes ``h`` into a given buffer, and ``glu_backward_inplace`` writes
``dgate`` over ``gate`` and ``dup`` over ``up`` (the saved buffers are dead after this point)
and, optionally, the recomputed ``h`` over ``dh`` (also dead once read), so the backward of the
whole MLP block needs no (tokens x intermediate) buffer beyond the three it already holds.

All kernels load in any float dtype, compute in fp32 and cast on store.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ._backend import interpreting, next_power_of_2, use_triton
from ._launch import launch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - platforms without triton use the reference
    triton = None

# Activation ids, a constexpr of the kernels.
SILU, GELU, GELU_TANH = 0, 1, 2
ACTIVATIONS = {"swiglu": SILU, "geglu": GELU, "geglu_tanh": GELU_TANH}
_GELU_APPROXIMATE = {"none": GELU, "tanh": GELU_TANH}

if triton is not None:

    @triton.jit
    def _activation_and_grad(g, ACTIVATION: tl.constexpr, NEED_GRAD: tl.constexpr):
        """(act(g), act'(g)) in fp32 for the activation id ACTIVATION (act' only if NEED_GRAD)."""
        if ACTIVATION == 0:  # silu
            sig = tl.sigmoid(g)
            act = g * sig
            if NEED_GRAD:
                grad = sig * (1.0 + g * (1.0 - sig))
            else:
                grad = act
        elif ACTIVATION == 1:  # exact gelu
            cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            act = g * cdf
            if NEED_GRAD:
                grad = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
            else:
                grad = act
        else:  # tanh gelu: 0.5 g (1 + tanh z) = g sigmoid(2 z)
            z2 = 1.5957691216057308 * (g + 0.044715 * g * g * g)  # 2 z = 2 sqrt(2/pi) (g + c g^3)
            sig = tl.sigmoid(z2)
            act = g * sig
            if NEED_GRAD:
                grad = sig + g * sig * (1.0 - sig) * 1.5957691216057308 * (1.0 + 0.134145 * g * g)
            else:
                grad = act
        return act, grad

    @triton.jit
    def _tile(n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """(rows as int64 column vector, cols as row vector, mask) of this program's tile."""
        rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return rows[:, None], cols[None, :], mask

    # the token count changes from step to step: not specialized on (Triton would compile a second
    # variant the first time it is a multiple of 16, in the middle of a run)
    @triton.jit(do_not_specialize=["n_rows"])
    def _glu_forward_kernel(
        gate_ptr, up_ptr, h_ptr, n_rows, n_cols,
        stride_gate, stride_up, stride_h,
        ACTIVATION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):
        """h = act(gate) * up on one (BLOCK_ROWS x BLOCK_COLS) tile (grid: row tiles x column tiles).

        Reads gate and up once, writes h once; fp32 in registers, cast to h's dtype on store.
        """
        rows, cols, mask = _tile(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
        g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        act, _ = _activation_and_grad(g, ACTIVATION, False)
        tl.store(h_ptr + rows * stride_h + cols, (act * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["n_rows"])
    def _glu_backward_kernel(
        dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, h_ptr, n_rows, n_cols,
        stride_dh, stride_gate, stride_up, stride_dgate, stride_dup, stride_h,
        ACTIVATION: tl.constexpr, STORE_H: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):
        """dgate = dh * up * act'(gate), dup = dh * act(gate) [, h = act(gate) * up].

        Recomputes act(gate) from gate (nothing but gate and up is saved). Every element is
        loaded and then stored by the same program, so dgate/dup may alias gate/up and h may
        alias dh: the LoRA MLP backward runs fully in place that way.
        """
        rows, cols, mask = _tile(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
        dh = tl.load(dh_ptr + rows * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        act, act_grad = _activation_and_grad(g, ACTIVATION, True)
        tl.store(dgate_ptr + rows * stride_dgate + cols, (dh * u * act_grad).to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + rows * stride_dup + cols, (dh * act).to(dup_ptr.dtype.element_ty), mask=mask)
        if STORE_H:
            tl.store(h_ptr + rows * stride_h + cols, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int, int]:
    """(grid, BLOCK_ROWS, BLOCK_COLS, num_warps).

    GPU: 2048-element tiles at 8 warps (8 values, one 16-byte 16-bit vector, per thread); a tile is
    one 2048-wide stretch of a row for wide rows such as llama's 14336 (which it divides), or
    several whole rows when rows are narrower. The interpreter pays per program, not per element:
    there tiles of up to 64K elements.
    """
    block_cols = min(2048, next_power_of_2(max(n_cols, 16)))
    tile = 65536 if interpreting() else 2048
    block_rows = min(max(1, tile // block_cols), next_power_of_2(n_rows))
    warps = max(1, min(8, block_rows * block_cols // 256))
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(n_cols, block_cols))
    return grid, block_rows, block_cols, warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View t as (rows, cols) with unit column stride and one row stride; copy only if impossible."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def glu_forward_2d(gate: torch.Tensor, up: torch.Tensor, activation: int, out: torch.Tensor | None = None):
    """h = act(gate) * up for 2-D (rows, cols) gate/up with unit column stride; written into ``out``
    (allocated in gate's dtype when None). Internal: used by the LoRA MLP."""
    rows, n_cols = gate.shape
    if out is None:
        out = torch.empty((rows, n_cols), dtype=gate.dtype, device=gate.device)
    if rows and n_cols:
        grid, block_rows, block_cols, warps = _launch_config(rows, n_cols)
        launch(
            _glu_forward_kernel, grid,
            gate, up, out, rows, n_cols, gate.stride(0), up.stride(0), out.stride(0),
            ACTIVATION=activation, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps,
        )
    return out


def glu_backward_2d(dh, gate, up, dgate, dup, activation: int, h_out=None):
    """dgate = dh*up*act'(gate), dup = dh*act(gate) (and h_out = act(gate)*up when given), all 2-D
    with unit column stride. Outputs may alias inputs (dgate is gate, dup is up, h_out is dh)."""
    rows, n_cols = gate.shape
    if rows and n_cols:
        grid, block_rows, block_cols, warps = _launch_config(rows, n_cols)
        h = dgate if h_out is None else h_out  # dummy pointer when STORE_H is off
        launch(
            _glu_backward_kernel, grid,
            dh, gate, up, dgate, dup, h, rows, n_cols,
            dh.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0), h.stride(0),
            ACTIVATION=activation, STORE_H=h_out is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            num_warps=warps,
        )
    return dgate, dup, h_out


def glu_backward_inplace(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int, store_h: bool = True):
    """The LoRA MLP's memory-saving backward: overwrites ``gate`` with dgate, ``up`` with dup and,
    if store_h, ``dh`` with the recomputed h = act(gate) * up. Returns (dgate, dup, h or None),
    which are the very buffers passed in. All 2-D with unit column stride."""
    return glu_backward_2d(dh, gate, up, gate, up, activation, h_out=dh if store_h else None)


class _GLUFunction(torch.autograd.Function):
    """h = act(gate) * up; saves gate and up only, recomputes act(gate) in the backward."""

    @staticmethod
    def forward(ctx, gate, up, activation: int):
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        gate2, up2 = _rows(gate), _rows(up)
        h = glu_forward_2d(gate2, up2, activation)
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return h.view(gate.shape)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        gate2, up2, dh2 = _rows(gate), _rows(up), _rows(dh)
        dgate = torch.empty(gate2.shape, dtype=gate.dtype, device=gate.device)
        dup = torch.empty(up2.shape, dtype=up.dtype, device=up.device)
        glu_backward_2d(dh2, gate2, up2, dgate, dup, ctx.activation)
        return (
            dgate.view(gate.shape) if ctx.needs_input_grad[0] else None,
            dup.view(up.shape) if ctx.needs_input_grad[1] else None,
            None,
        )


# ----------------------------------------------------------------------------- references
def _act_reference(gate32: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == SILU:
        return F.silu(gate32)
    return F.gelu(gate32, approximate="tanh" if activation == GELU_TANH else "none")


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    """act(gate) * up computed in fp32, returned in gate's dtype (autograd-differentiable)."""
    return (_act_reference(gate.float(), activation) * up.float()).to(gate.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return glu_reference(gate, up, SILU)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return glu_reference(gate, up, _gelu_id(approximate))


def _gelu_id(approximate: str) -> int:
    try:
        return _GELU_APPROXIMATE[approximate]
    except KeyError:
        raise ValueError(f"approximate must be 'none' or 'tanh', not {approximate!r}") from None


# ----------------------------------------------------------------------------- public
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Llama, Mistral, Qwen MLPs), in gate's dtype; any shape (gate.shape == up.shape)."""
    if use_triton(gate, up):
        return _GLUFunction.apply(gate, up, SILU)
    return swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate) * up (Gemma MLPs: approximate="tanh" is transformers' gelu_pytorch_tanh)."""
    activation = _gelu_id(approximate)
    if use_triton(gate, up):
        return _GLUFunction.apply(gate, up, activation)
    return geglu_reference(gate, up, approximate)


def compile_specs():
    from .compile_check import CompileSpec

    specs = []
    dtypes = {"fp16": (75, 80, 90), "bf16": (80, 90), "fp32": (75, 80, 90)}
    # tiles: a 2048-wide stretch of one row (wide rows, e.g. 14336), and 16 whole rows of 128
    tiles = {"fp16": ((1, 2048), (16, 128)), "bf16": ((1, 2048),), "fp32": ((1, 2048),)}
    for (dname, targets), (act_name, act) in itertools.product(dtypes.items(), ACTIVATIONS.items()):
        ptr = f"*{dname}"
        for block_rows, block_cols in tiles[dname]:
            tag = f"{act_name},{dname},{block_rows}x{block_cols}"
            specs.append(CompileSpec(
                name=f"glu_forward[{tag}]", fn=_glu_forward_kernel,
                signature=dict(gate_ptr=ptr, up_ptr=ptr, h_ptr=ptr, n_rows="i32", n_cols="i32", stride_gate="i32",
                               stride_up="i32", stride_h="i32", ACTIVATION="constexpr",
                               BLOCK_ROWS="constexpr", BLOCK_COLS="constexpr"),
                constexprs=dict(ACTIVATION=act, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols), targets=targets,
            ))
            for store_h in (False, True):
                specs.append(CompileSpec(
                    name=f"glu_backward[{tag},h={int(store_h)}]", fn=_glu_backward_kernel,
                    signature=dict(dh_ptr=ptr, gate_ptr=ptr, up_ptr=ptr, dgate_ptr=ptr, dup_ptr=ptr, h_ptr=ptr,
                                   n_rows="i32", n_cols="i32", stride_dh="i32", stride_gate="i32", stride_up="i32",
                                   stride_dgate="i32", stride_dup="i32", stride_h="i32",
                                   ACTIVATION="constexpr", STORE_H="constexpr",
                                   BLOCK_ROWS="constexpr", BLOCK_COLS="constexpr"),
                    constexprs=dict(ACTIVATION=act, STORE_H=store_h, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols),
                    targets=targets,
                ))
    return specs
