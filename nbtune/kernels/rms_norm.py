"""RMSNorm, Llama's ``w * x_hat`` and Gemma's ``(1 + w) * x_hat``, forward and backward in Triton.

    y = x_hat * (w + offset),   x_hat = x * rstd,   rstd = 1 / sqrt(mean(x**2) + eps)   (over the last dim)

What it fuses: the square, the row mean, the rsqrt, the scale and the weight multiply are one pass
over ``x`` (eager torch runs ~6 kernels and writes an fp32 copy of ``x`` and of ``x_hat``). The
backward is one pass over ``x`` and ``dy`` that writes ``dx`` and, only when the weight needs a
gradient, per-program fp32 partial sums of ``dw`` that one small ``sum(0)`` reduces.

What it saves: for backward only ``x`` (which the caller holds anyway, it is the residual stream)
and one fp32 ``rstd`` per row (4 bytes per token), instead of the fp32 ``x`` / ``x_hat`` copies
autograd keeps for the eager module (with hidden 4096 and 4096 tokens: 16 KiB instead of 128 MiB
per norm).

Casting conventions (``casting=``; by default chosen by ``offset``), both copied from
transformers 5.17 so a patched model gives the numbers the unpatched one gives:

- ``"llama"`` (default when ``offset == 0``; LlamaRMSNorm, and Mistral/Qwen2/Qwen3/Phi3 which copy
  it): ``x_hat`` is computed in fp32, *cast to the input dtype*, then multiplied by the weight:
  ``weight * x_hat.to(x.dtype)``. The result's dtype is ``promote(x.dtype, weight.dtype)``, so a
  norm whose weight was upcast to fp32 (peft's ``prepare_model_for_kbit_training``) returns fp32,
  exactly like the HF module. (A product of two 16-bit floats is exact in fp32, so computing the
  multiply in fp32 and rounding once gives the bits torch's 16-bit multiply gives.)
- ``"gemma"`` (default when ``offset != 0``; GemmaRMSNorm, Gemma2/Gemma3RMSNorm): everything in
  fp32, ``x_hat * (offset + weight.float())``, cast once to ``x.dtype``.

Backward (per row, N = hidden size, w' = w + offset, g = w' * dy):

    y_j   = w'_j * x_hat_j,   x_hat_j = x_j * rstd,   rstd = (mean_k x_k^2 + eps)^(-1/2)
    d rstd / d x_i = -rstd^3 * x_i / N
    dx_i  = sum_j g_j * d x_hat_j / d x_i = g_i * rstd - sum_j g_j x_j * rstd^3 * x_i / N
          = rstd * (g_i - x_hat_i * mean_j(x_hat_j * g_j))
    dw_j  = sum_rows dy_j * x_hat_j        (x_hat rounded to x.dtype first under "llama" casting,
                                            as the HF module multiplies the rounded value)

The cast of ``x_hat`` to the input dtype is treated as the identity in the backward (as autograd
does). All arithmetic is fp32; only stores cast.
"""
from __future__ import annotations

import functools

import torch

from ._backend import HAS_TRITON, next_power_of_2, use_triton
from ._launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - the reference path needs no triton
    triton = None

# Widest row block held in registers; longer rows are processed in chunks of this many columns
# (two passes over the row). Module-level so tests can shrink it to exercise the chunked path.
MAX_BLOCK_N = 16384
# Rows per program are chosen so a program handles about this many elements (narrow rows, e.g.
# the per-head q/k norms of Qwen3 / Gemma3 with 128 columns, get many rows per program).
TILE_ELEMENTS = 4096
# The backward that accumulates dw runs persistent programs (each writes one fp32 partial row of
# dw): this many per SM, each taking BWD_DW_ROWS rows per loop iteration with BWD_DW_WARPS warps
# (None: the forward's rows and warps). Module-level so benchmarks/tune_rms_norm_bwd.py can sweep them.
# BWD_DW_STAGES > 1 software-pipelines the persistent loop. H200, 4096 x 4096 bf16 fwd+bwd (GPU ms,
# benchmarks/results/tune-rms-norm-bwd-*.json): 1 program / 2 rows / 8 warps / 3 stages 0.0529 (74%
# of copy bandwidth); unpipelined, 1 / 4 / 8 took 0.0573-0.0576 and the earlier 2 / (1) / (8) 0.0602-0.0607.
BWD_PROGRAMS_PER_SM = 1
BWD_DW_ROWS = 2
BWD_DW_WARPS = 8
BWD_DW_STAGES = 3

CASTINGS = ("llama", "gemma")


def _resolve_casting(casting: str | None, offset: float) -> str:
    if casting is None:
        return "gemma" if offset != 0.0 else "llama"
    if casting not in CASTINGS:
        raise ValueError(f"casting={casting!r} is not one of {CASTINGS} (or None)")
    return casting


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
                       casting: str | None = None) -> torch.Tensor:
    """Plain-torch RMSNorm with the casting order of the matching transformers module."""
    casting = _resolve_casting(casting, offset)
    input_dtype = x.dtype
    xf = x.to(torch.float32)
    x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama":  # LlamaRMSNorm: weight * x_hat.to(input_dtype)
        w = weight if offset == 0.0 else weight + offset
        return w * x_hat.to(input_dtype)
    # GemmaRMSNorm: (x_hat * (1.0 + weight.float())).type_as(x)
    return (x_hat * (offset + weight.float())).to(input_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    # the token count changes from step to step: not specialized on (Triton would compile a second
    # variant the first time it is a multiple of 16, in the middle of a run)
    @triton.jit(do_not_specialize=["n_rows"])
    def _rms_norm_fwd_kernel(
        x_ptr, w_ptr, y_ptr, rstd_ptr,
        n_rows, n_cols, x_row_stride, y_row_stride,
        eps, offset,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr,
        LLAMA_CASTING: tl.constexpr,
    ):
        """y = x_hat * (w + offset) for BLOCK_M rows; stores y and the fp32 rstd of each row.

        NUM_CHUNKS == 1: the row block sits in registers, x is read once. NUM_CHUNKS > 1 (rows
        wider than MAX_BLOCK_N): one pass sums squares chunk by chunk, a second pass re-reads the
        row (mostly from L2) to normalise and store.
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
        y_rows = y_ptr + rows.to(tl.int64)[:, None] * y_row_stride
        col_in_block = tl.arange(0, BLOCK_N)

        if NUM_CHUNKS == 1:
            col_mask = col_in_block < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_rows + col_in_block[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
            x_hat = x * rstd[:, None]
            w = tl.load(w_ptr + col_in_block, mask=col_mask, other=0.0).to(tl.float32) + offset
            if LLAMA_CASTING:  # HF: weight * x_hat.to(input_dtype)
                x_hat = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
            y = x_hat * w[None, :]
            tl.store(y_rows + col_in_block[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            sum_sq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_N + col_in_block
                mask = row_mask[:, None] & (cols < n_cols)[None, :]
                x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                sum_sq += x * x
            rstd = tl.rsqrt(tl.sum(sum_sq, axis=1) / n_cols + eps)
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_N + col_in_block
                col_mask = cols < n_cols
                mask = row_mask[:, None] & col_mask[None, :]
                x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                x_hat = x * rstd[:, None]
                w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
                if LLAMA_CASTING:
                    x_hat = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
                y = x_hat * w[None, :]
                tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)

    @triton.jit(do_not_specialize=["n_rows"])
    def _rms_norm_bwd_kernel(
        dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, row_dot_ptr,
        n_rows, n_cols, dy_row_stride, x_row_stride, dx_row_stride,
        offset,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr,
        LLAMA_CASTING: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
        NUM_STAGES: tl.constexpr = 1,
    ):
        """dx = rstd * (g - x_hat * mean(x_hat * g)), g = (w + offset) * dy; dw partials per program.

        A persistent loop: program p handles row blocks p, p + P, p + 2P, ... (P = programs) and,
        when COMPUTE_DW, sums dy * x_hat over them in fp32 registers, then writes one row of
        ``dw_partial`` [P, n_cols]; the host sums the P rows. NUM_STAGES > 1 asks Triton to pipeline
        that loop (the next row block's loads issued while this one is computed). With COMPUTE_DW
        off the host launches one program per row block and no partials exist at all.

        NUM_CHUNKS > 1 (very wide rows): pass 1 computes mean(x_hat * g) per row into the fp32
        scratch ``row_dot``; pass 2 walks the columns chunk by chunk (outer) over the program's
        rows (inner), so each chunk's dw partial still accumulates in registers.
        """
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        n_row_blocks = tl.cdiv(n_rows, BLOCK_M)
        col_in_block = tl.arange(0, BLOCK_N)
        row_in_block = tl.arange(0, BLOCK_M)

        if NUM_CHUNKS == 1:
            col_mask = col_in_block < n_cols
            w = tl.load(w_ptr + col_in_block, mask=col_mask, other=0.0).to(tl.float32) + offset
            dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for row_block in tl.range(pid, n_row_blocks, n_programs, num_stages=NUM_STAGES):
                rows = row_block * BLOCK_M + row_in_block
                row_mask = rows < n_rows
                rows64 = rows.to(tl.int64)[:, None]
                mask = row_mask[:, None] & col_mask[None, :]
                x = tl.load(x_ptr + rows64 * x_row_stride + col_in_block[None, :], mask=mask, other=0.0)
                dy = tl.load(dy_ptr + rows64 * dy_row_stride + col_in_block[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
                x_hat = x.to(tl.float32) * rstd[:, None]
                if COMPUTE_DX:
                    g = dy * w[None, :]
                    row_dot = tl.sum(x_hat * g, axis=1) / n_cols
                    dx = rstd[:, None] * (g - x_hat * row_dot[:, None])
                    tl.store(dx_ptr + rows64 * dx_row_stride + col_in_block[None, :],
                             dx.to(dx_ptr.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    if LLAMA_CASTING:
                        x_hat = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
                    dw_acc += tl.sum(dy * x_hat, axis=0)
            if COMPUTE_DW:
                tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + col_in_block, dw_acc, mask=col_mask)
        else:
            # pass 1: row_dot = mean(x_hat * g) for each of this program's rows (dx needs it)
            if COMPUTE_DX:
                for row_block in range(pid, n_row_blocks, n_programs):
                    rows = row_block * BLOCK_M + row_in_block
                    row_mask = rows < n_rows
                    rows64 = rows.to(tl.int64)[:, None]
                    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
                    dot_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    for chunk in range(NUM_CHUNKS):
                        cols = chunk * BLOCK_N + col_in_block
                        col_mask = cols < n_cols
                        mask = row_mask[:, None] & col_mask[None, :]
                        x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0)
                        dy = tl.load(dy_ptr + rows64 * dy_row_stride + cols[None, :], mask=mask, other=0.0)
                        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
                        dot_acc += x.to(tl.float32) * dy.to(tl.float32) * w[None, :]
                    row_dot = tl.sum(dot_acc, axis=1) * rstd / n_cols
                    tl.store(row_dot_ptr + rows, row_dot, mask=row_mask)
            tl.debug_barrier()  # row_dot is re-read below by other threads of this program
            # pass 2: dx per chunk, dw partial of the chunk in registers
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_N + col_in_block
                col_mask = cols < n_cols
                w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
                dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for row_block in range(pid, n_row_blocks, n_programs):
                    rows = row_block * BLOCK_M + row_in_block
                    row_mask = rows < n_rows
                    rows64 = rows.to(tl.int64)[:, None]
                    mask = row_mask[:, None] & col_mask[None, :]
                    x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0)
                    dy = tl.load(dy_ptr + rows64 * dy_row_stride + cols[None, :], mask=mask,
                                 other=0.0).to(tl.float32)
                    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
                    x_hat = x.to(tl.float32) * rstd[:, None]
                    if COMPUTE_DX:
                        row_dot = tl.load(row_dot_ptr + rows, mask=row_mask, other=0.0)
                        dx = rstd[:, None] * (dy * w[None, :] - x_hat * row_dot[:, None])
                        tl.store(dx_ptr + rows64 * dx_row_stride + cols[None, :],
                                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
                    if COMPUTE_DW:
                        if LLAMA_CASTING:
                            x_hat = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
                        dw_acc += tl.sum(dy * x_hat, axis=0)
                if COMPUTE_DW:
                    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _launch_config(n_cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, NUM_CHUNKS, num_warps) for rows of n_cols elements."""
    block_n = min(next_power_of_2(n_cols), MAX_BLOCK_N)
    num_chunks = -(-n_cols // block_n)
    block_m = max(1, TILE_ELEMENTS // block_n) if num_chunks == 1 else 1
    tile = block_m * block_n
    # ~8-32 fp32 values per thread per row tile: 16-byte vector loads, no spills at 16K columns.
    num_warps = min(16, max(4, tile // 512))
    return block_m, block_n, num_chunks, num_warps


def _bwd_launch_config(n_cols: int, compute_dw: bool) -> tuple[int, int, int, int, int]:
    """The backward's (BLOCK_M, BLOCK_N, NUM_CHUNKS, num_warps, NUM_STAGES): the forward's and one
    stage, except that with dw (persistent programs, few per SM) one-chunk rows may take
    BWD_DW_ROWS rows and BWD_DW_WARPS warps per iteration in a loop pipelined in BWD_DW_STAGES
    stages, so that each program keeps more loads in flight."""
    block_m, block_n, num_chunks, num_warps = _launch_config(n_cols)
    num_stages = 1
    if compute_dw and num_chunks == 1:
        if BWD_DW_ROWS is not None:
            block_m = max(block_m, next_power_of_2(BWD_DW_ROWS))  # tl.arange needs a power of 2
        if BWD_DW_WARPS is not None:
            num_warps = BWD_DW_WARPS
        num_stages = BWD_DW_STAGES
    return block_m, block_n, num_chunks, num_warps, num_stages


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _n_programs_for_dw(x: torch.Tensor, n_row_blocks: int) -> int:
    if x.is_cuda:
        target = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
        target *= BWD_PROGRAMS_PER_SM
    else:  # Triton interpreter: a few programs, so the persistent loop runs several iterations
        target = 3
    return max(1, min(n_row_blocks, target))


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    rows = t.reshape(-1, n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


# --------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------
class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, llama_casting):
        n_cols = x.shape[-1]
        x_rows = _as_rows(x, n_cols)
        n_rows = x_rows.shape[0]
        weight = weight.contiguous()
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if llama_casting else x.dtype
        # y is allocated in x's shape (not returned as a view of a 2-D buffer), so later in-place
        # users (RoPE after Qwen3/Gemma3's per-head q/k norm) can write into it
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        y_rows = y.view(n_rows, n_cols)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_m, block_n, num_chunks, num_warps = _launch_config(n_cols)
        grid = (triton.cdiv(n_rows, block_m),)
        launch(
            _rms_norm_fwd_kernel, grid,
            x_rows, weight, y_rows, rstd,
            n_rows, n_cols, x_rows.stride(0), y_rows.stride(0),
            float(eps), float(offset),
            BLOCK_M=block_m, BLOCK_N=block_n, NUM_CHUNKS=num_chunks, LLAMA_CASTING=llama_casting,
            num_warps=num_warps,
        )
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.offset = float(offset)
        ctx.llama_casting = llama_casting
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x_rows, weight, rstd = ctx.saved_tensors
        compute_dx, compute_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_rows, n_cols = x_rows.shape
        dy_rows = _as_rows(dy, n_cols)
        block_m, block_n, num_chunks, num_warps, num_stages = _bwd_launch_config(n_cols, compute_dw)
        n_row_blocks = triton.cdiv(n_rows, block_m)
        n_programs = _n_programs_for_dw(x_rows, n_row_blocks) if compute_dw else n_row_blocks
        dx = torch.empty(ctx.x_shape, dtype=x_rows.dtype, device=x_rows.device) if compute_dx else None
        dx_rows = dx.view(n_rows, n_cols) if compute_dx else x_rows  # x_rows: unused when COMPUTE_DX is off
        dw_partial = (torch.empty((n_programs, n_cols), dtype=torch.float32, device=x_rows.device)
                      if compute_dw else None)
        row_dot = (torch.empty(n_rows, dtype=torch.float32, device=x_rows.device)
                   if num_chunks > 1 and compute_dx else None)
        launch(
            _rms_norm_bwd_kernel, (n_programs,),
            dy_rows, x_rows, weight, rstd,
            dx_rows,
            dw_partial if compute_dw else rstd,    # unused pointer when COMPUTE_DW is off
            row_dot if row_dot is not None else rstd,
            n_rows, n_cols, dy_rows.stride(0), x_rows.stride(0), dx_rows.stride(0),
            ctx.offset,
            BLOCK_M=block_m, BLOCK_N=block_n, NUM_CHUNKS=num_chunks,
            LLAMA_CASTING=ctx.llama_casting, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw,
            NUM_STAGES=num_stages,
            num_warps=num_warps,
        )
        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        return dx, dw, None, None, None


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             casting: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape): ``x_hat * (weight + offset)``.

    offset=0.0: LlamaRMSNorm; offset=1.0: Gemma's ``(1 + w)`` form. ``casting`` ("llama" or
    "gemma") picks the rounding order of the matching transformers module; None picks "gemma"
    when offset != 0 and "llama" otherwise (see the module docstring). No gradient flows to
    ``weight`` (and its reduction is skipped) when ``weight.requires_grad`` is False.
    """
    llama_casting = _resolve_casting(casting, offset) == "llama"
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not fit x of shape {tuple(x.shape)}")
    if x.numel() > 0 and use_triton(x, weight):
        return _RMSNormFunction.apply(x, weight, eps, offset, llama_casting)
    return rms_norm_reference(x, weight, eps, offset, casting)


# --------------------------------------------------------------------------------------------
# Compile specs
# --------------------------------------------------------------------------------------------
def compile_specs():
    """Every kernel, for the dtype combinations a model uses, as the host launches them."""
    from .compile_check import CompileSpec

    dtypes = {"fp16": (75, 80, 90), "bf16": (80, 90), "fp32": (75, 80, 90)}
    specs = []
    # (x dtype, weight dtype, y dtype, casting); fp32 weights with 16-bit activations is what
    # peft's prepare_model_for_kbit_training leaves (Llama casting then returns fp32).
    combos = [("fp16", "fp16", "fp16", True), ("fp16", "fp16", "fp16", False),
              ("bf16", "bf16", "bf16", True), ("bf16", "bf16", "bf16", False),
              ("fp32", "fp32", "fp32", True),
              ("fp16", "fp32", "fp32", True), ("bf16", "fp32", "fp32", True), ("fp16", "fp32", "fp16", False)]
    for x_t, w_t, y_t, llama in combos:
        targets = (80, 90) if "bf16" in (x_t, w_t, y_t) else (75, 80, 90)
        tag = f"x{x_t}_w{w_t}_{'llama' if llama else 'gemma'}"
        # 4096: one row per program; 128: many rows per program (per-head q/k norms);
        # 20000: the chunked path for rows wider than MAX_BLOCK_N.
        # (CompileSpec carries no num_warps: the chunked kernels compile slowly at the default 4
        # warps, so they are checked for fp16 and one gradient variant only.)
        widths = {"fp16": (4096, 128, 20000), "bf16": (4096, 128)}.get(x_t, (4096,))
        for n_cols in (widths if x_t == w_t and llama else (4096,)):
            block_m, block_n, num_chunks, _ = _launch_config(n_cols)
            sig = {
                "x_ptr": f"*{x_t}", "w_ptr": f"*{w_t}", "y_ptr": f"*{y_t}", "rstd_ptr": "*fp32",
                "n_rows": "i32", "n_cols": "i32", "x_row_stride": "i32", "y_row_stride": "i32",
                "eps": "fp32", "offset": "fp32",
                "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "NUM_CHUNKS": "constexpr",
                "LLAMA_CASTING": "constexpr",
            }
            cx = dict(BLOCK_M=block_m, BLOCK_N=block_n, NUM_CHUNKS=num_chunks, LLAMA_CASTING=llama)
            specs.append(CompileSpec(f"rms_norm_fwd[{tag},N={n_cols}]", _rms_norm_fwd_kernel, sig, cx, targets))
            grads = [(True, True), (True, False)] + ([(False, True)] if x_t == w_t and llama else [])
            grads = grads if num_chunks == 1 else grads[:1]
            for compute_dx, compute_dw in grads:
                block_m, block_n, num_chunks, _, num_stages = _bwd_launch_config(n_cols, compute_dw)
                sig = {
                    "dy_ptr": f"*{y_t}", "x_ptr": f"*{x_t}", "w_ptr": f"*{w_t}", "rstd_ptr": "*fp32",
                    "dx_ptr": f"*{x_t}", "dw_partial_ptr": "*fp32", "row_dot_ptr": "*fp32",
                    "n_rows": "i32", "n_cols": "i32", "dy_row_stride": "i32", "x_row_stride": "i32",
                    "dx_row_stride": "i32", "offset": "fp32",
                    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "NUM_CHUNKS": "constexpr",
                    "LLAMA_CASTING": "constexpr", "COMPUTE_DX": "constexpr", "COMPUTE_DW": "constexpr",
                    "NUM_STAGES": "constexpr",
                }
                cx = dict(BLOCK_M=block_m, BLOCK_N=block_n, NUM_CHUNKS=num_chunks, LLAMA_CASTING=llama,
                          COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw, NUM_STAGES=num_stages)
                specs.append(CompileSpec(f"rms_norm_bwd[{tag},N={n_cols},dx={int(compute_dx)},dw={int(compute_dw)}]",
                                         _rms_norm_bwd_kernel, sig, cx, targets))
    return specs
