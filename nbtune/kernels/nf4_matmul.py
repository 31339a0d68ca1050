"""``x @ W^T`` for a few tokens straight from an NF4 weight: the decoding step's base projection.

When a model generates (GRPO's completions, ``result.generate``, chat), each step feeds one token
per sequence, so a projection's input ``x`` is (M, K) with M the batch of sequences. Its
cost is then reading the weight, not the arithmetic. Dequantize-then-GEMM (the training path,
:func:`nbtune.kernels.nf4.dequantize_base` + cuBLAS) reads the packed NF4 bytes (0.5 byte per
value), writes the dense 16-bit weight (2 bytes) and reads it back (2 bytes): 4.5 bytes per
weight value, ~36 GB per token for an 8B model. This kernel decodes the nibbles in registers and
multiplies them into the tokens at once: 0.5 byte per value plus the scales, ~9x less traffic;
on a memory-bound GPU (a T4 reads 320 GB/s) that is the decoding step's time.

    y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = dtype(NF4[code(n, k)] * absmax[block(n, k)])

with ``W`` exactly :func:`~nbtune.kernels.nf4.dequantize_base`'s (same fp32 products, same
rounding to ``quant_state.dtype`` and then to x's dtype), products and sums in fp32 (``tl.dot``
with an fp32 accumulator; fp32 inputs multiply in IEEE fp32, never TF32), one rounding to x's dtype
at the end. Results match dequantize + GEMM up to the order of the fp32 sums.

Layout: bitsandbytes' (see nf4.py): row n of W is ``K / 2`` packed bytes, value 2j in the high
nibble of byte j; one scale per ``blocksize`` consecutive values, so a row holds ``K / blocksize``
whole blocks when K is a multiple of blocksize (every model's projections; other shapes take the
dequantize + GEMM path). Each program owns BLOCK_N output features and walks one quantization
block (BLOCKSIZE values) of K per iteration: it decodes the block's scale for each of its rows,
splits the packed bytes into even and odd columns and multiplies them into the tokens' even and
odd columns (two ``tl.dot`` of [BLOCK_M, BLOCKSIZE/2] x [BLOCKSIZE/2, BLOCK_N]); no interleaving
shuffle. Few output features (k/v projections: N = 1024) would leave most SMs idle, so K is
split over a second grid axis until there are about two programs per SM; split programs write
fp32 partial sums that one ``sum(0)`` reduces (deterministic, no atomics).

No backward: the base weight is frozen and decoding needs no gradient; a LoRA layer's backward
(nbtune/kernels/lora.py) dequantizes W for its dX GEMM as before.
"""
from __future__ import annotations

import contextlib
from math import prod

import torch

from ._backend import HAS_TRITON, interpreting, use_triton
from ._launch import launch
from .nf4 import _TL_DTYPES, _nf4_table, _second_level, dequantize_base, keep_plan

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .nf4 import block_scales, round_twice

__all__ = ["MAX_TOKENS", "decode_product", "matmul_plan", "nf4_matmul", "nf4_matmul_reference", "nf4_weight_of"]

# The most tokens (rows of x) the kernel takes: one 16-row tile (tl.dot's smallest) per program, which
# holds a decoding batch; longer inputs (prefill, training) dequantize once for a cuBLAS GEMM.
MAX_TOKENS = 16
BLOCK_N = 64
PROGRAMS_PER_SM = 2
_sm_counts: dict = {}


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _nf4_matmul_kernel(
        x_ptr,  # [M, K] in DTYPE, rows stride_xm apart, columns contiguous
        packed_ptr,  # uint8 [N * K / 2]: W row-major, value 2j in the high nibble of byte j
        absmax_ptr,  # [N * K / BLOCKSIZE]: scales, or uint8 codes into code2 when NESTED
        absmax2_ptr,  # fp32 (NESTED only)
        code2_ptr,  # fp32 [256] (NESTED only)
        offset_ptr,  # fp32 [1] (NESTED only)
        nf4_ptr,  # fp32 [16]: the NF4 table
        out_ptr,  # [M, N] in DTYPE, or fp32 [splits, M, N] partial sums when PARTIAL
        M, N, K, stride_xm, blocksize2, blocks_per_split,
        BLOCK_M: tl.constexpr,  # >= M, a power of two >= 16 (tl.dot's smallest tile)
        BLOCK_N: tl.constexpr,
        BLOCKSIZE: tl.constexpr,  # values per scale; K is a multiple of it
        NESTED: tl.constexpr,
        ROUND_DTYPE: tl.constexpr,  # quant_state.dtype: the dequantized value is rounded to it first
        DTYPE: tl.constexpr,  # x's dtype: W's values are rounded to it, y is written in it
        PARTIAL: tl.constexpr,  # K split over program_id(1): write fp32 partial sums
        INTERPRETER: tl.constexpr,  # Triton's interpreter: bf16 rounded by bits, dots in fp32
    ):
        """y[:, n0:n0+BLOCK_N] (or its part over this program's share of K) for all M tokens.

        Per quantization block of K: the block's scale for each of the BLOCK_N rows (one uint8
        code, one absmax2 load and one table lookup each when nested), the BLOCKSIZE/2 packed
        bytes of each row, their high and low nibbles decoded to W's even and odd columns, then
        two fp32-accumulating dots with the tokens' even and odd columns. No backward (frozen W).
        """
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tokens = tl.arange(0, BLOCK_M)
        token_ok = tokens < M
        pairs = tl.arange(0, HALF)
        k_blocks = K // BLOCKSIZE
        first = pid_k * blocks_per_split
        last = tl.minimum(first + blocks_per_split, k_blocks)
        row_blocks = rows.to(tl.int64) * k_blocks
        x_rows = x_ptr + tokens[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(first, last):
            blocks = row_blocks + kb
            scale = block_scales(blocks, row_ok, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocksize2, NESTED)
            packed = tl.load(packed_ptr + blocks[:, None] * HALF + pairs[None, :], mask=row_ok[:, None],
                             other=0).to(tl.int32)
            w_even = round_twice(tl.load(nf4_ptr + (packed >> 4)) * scale[:, None], ROUND_DTYPE, DTYPE, INTERPRETER)
            w_odd = round_twice(tl.load(nf4_ptr + (packed & 15)) * scale[:, None], ROUND_DTYPE, DTYPE, INTERPRETER)
            x_at = x_rows + (kb * BLOCKSIZE + 2 * pairs)[None, :]
            x_even = tl.load(x_at, mask=token_ok[:, None], other=0.0)
            x_odd = tl.load(x_at + 1, mask=token_ok[:, None], other=0.0)
            if INTERPRETER:  # its dot reads bf16 as raw bits; 16-bit products are exact in fp32 anyway
                w_even, w_odd = w_even.to(tl.float32), w_odd.to(tl.float32)
                x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
                acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision="ieee")
                acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision="ieee")
            elif DTYPE == tl.float32:
                acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision="ieee")
                acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_even, tl.trans(w_even), acc)
                acc = tl.dot(x_odd, tl.trans(w_odd), acc)
        at = tokens[:, None].to(tl.int64) * N + rows[None, :]
        ok = token_ok[:, None] & row_ok[None, :]
        if PARTIAL:
            tl.store(out_ptr + pid_k.to(tl.int64) * M * N + at, acc, mask=ok)
        else:
            tl.store(out_ptr + at, acc.to(DTYPE), mask=ok)


# --------------------------------------------------------------------------------------------
# Which weights, and how to launch
# --------------------------------------------------------------------------------------------
def _weight_and_state(base):
    """(weight tensor, quant_state or None) of a base: a ``Params4bit``, or a module holding one
    (bnb keeps a copy of the state on ``Linear4bit`` too)."""
    if isinstance(base, torch.nn.Module):
        weight = getattr(base, "weight", None)
        state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
        return weight, state
    return base, getattr(base, "quant_state", None)


def nf4_weight_of(base):
    """(packed bytes, quant_state) of an NF4 base the kernel reads (``Params4bit`` or a module with
    one, e.g. ``Linear4bit``), or None: not 4-bit, not NF4, a CPU-repacked or transposed layout,
    blocks that straddle rows or fall outside 32-256 values (a program holds one block of each of its
    rows: a [64, blocksize / 2] tile), a second level that is not fp32."""
    weight, state = _weight_and_state(base)
    if not torch.is_tensor(weight) or state is None:
        return None
    if getattr(state, "quant_type", None) != "nf4" or getattr(state, "packing_format_for_cpu", False):
        return None
    shape = tuple(state.shape)
    blocksize = int(state.blocksize)
    if len(shape) != 2 or not 32 <= blocksize <= 256 or blocksize & (blocksize - 1) or shape[1] % blocksize:
        return None
    if state.nested and state.state2.dtype not in (None, torch.float32):
        return None
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    if data.dim() >= 1 and data.shape[0] == 1 and prod(shape) > 2:  # bnb's old transposed packing
        return None
    packed = data if data.dtype == torch.uint8 else data.contiguous().view(torch.uint8)
    return packed.reshape(-1), state


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_counts.get(index)
    if count is None:
        count = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def k_split(n: int, k_blocks: int, sms: int) -> tuple[int, int]:
    """(splits, blocks per split): K's quantization blocks shared out so that the grid has about
    PROGRAMS_PER_SM programs per SM (no split where the output features alone give that many)."""
    programs = -(-n // BLOCK_N)
    splits = max(1, min(k_blocks, -(-PROGRAMS_PER_SM * sms // programs)))
    per_split = -(-k_blocks // splits)
    return -(-k_blocks // per_split), per_split


class _Plan:
    """One NF4 weight's launch, derived once per (weight, tokens' dtype, device): a decoding step
    multiplies every projection once per token, ~220 calls per token for an 8B model, so the
    layout checks, the second-level scales and the K split are not redone per call."""

    __slots__ = ("n", "k", "fixed", "grid", "splits", "per_split", "blocksize2", "meta")

    def __init__(self, packed, state, dtype, device):
        self.n, self.k = tuple(state.shape)
        blocksize = int(state.blocksize)
        extra, self.blocksize2 = _second_level(state, device)
        self.fixed = (packed, state.absmax, *extra, _nf4_table(device))
        self.splits, self.per_split = k_split(self.n, self.k // blocksize, _sm_count(device))
        self.grid = (triton.cdiv(self.n, BLOCK_N), self.splits)
        self.meta = dict(BLOCK_M=16, BLOCK_N=BLOCK_N, BLOCKSIZE=blocksize, NESTED=bool(state.nested),
                         ROUND_DTYPE=_TL_DTYPES[state.dtype], DTYPE=_TL_DTYPES[dtype], PARTIAL=self.splits > 1,
                         INTERPRETER=interpreting(), num_warps=4, enable_fp_fusion=False)

    def run(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        target = torch.empty((self.splits, m, self.n), dtype=torch.float32, device=x.device) if self.splits > 1 else out
        launch(_nf4_matmul_kernel, self.grid, x, *self.fixed, target, m, self.n, self.k, x.stride(0),
               self.blocksize2, self.per_split, **self.meta)
        if self.splits > 1:
            torch.sum(target, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(target.sum(0))
        return out


def matmul_plan(base, dtype: torch.dtype, device: torch.device):
    """The cached :class:`_Plan` of an NF4 base for tokens of ``dtype`` on ``device``, or None where
    the kernel does not serve it (:func:`nf4_weight_of`), kept on the weight's QuantState and keyed
    by the tensors' addresses (a weight moved or re-quantized gets a new plan)."""
    weight, state = _weight_and_state(base)
    if state is None:
        return None
    key = (dtype, weight.data_ptr(), state.absmax.data_ptr(), device)
    plan = state.__dict__.get("_nbtune_matmul", {}).get(key)
    if plan is None:
        found = nf4_weight_of(base)
        plan = keep_plan(state, "_nbtune_matmul", key, False if found is None or dtype not in _TL_DTYPES
                         or not HAS_TRITON else _Plan(*found, dtype, device))
    return plan or None


def nf4_matmul(x: torch.Tensor, base, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T`` for a 2-D x (M <= MAX_TOKENS rows, fp16/bf16/fp32) and an NF4 base (what
    :func:`nf4_weight_of` reads), in x's dtype, W as ``dequantize_base(base, x.dtype)`` gives it;
    into ``out`` (a contiguous (M, N) tensor of x's dtype) when given. The Triton kernel on CUDA
    (or under ``NBTUNE_KERNELS=triton``), the reference elsewhere."""
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"nf4_matmul: x must be fp16, bf16 or fp32, got {x.dtype}")
    weight = nf4_weight_of(base)
    if weight is None:
        raise ValueError("nf4_matmul reads an NF4 weight of bitsandbytes' layout with whole blocks per row")
    n, k = tuple(weight[1].shape)
    if x.dim() != 2 or x.shape[1] != k or x.shape[0] > MAX_TOKENS:
        raise ValueError(f"nf4_matmul: x must be (M <= {MAX_TOKENS}, {k}), got {tuple(x.shape)}")
    if out is None:
        out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    if not use_triton(x, weight[0]):
        return out.copy_(nf4_matmul_reference(x, base))
    return decode_product(x if x.stride(1) == 1 else x.contiguous(), matmul_plan(base, x.dtype, x.device), out)


def decode_product(x: torch.Tensor, plan: _Plan, out: torch.Tensor) -> torch.Tensor:
    """``out = x @ W^T`` by a weight's plan: the per-token path of the LoRA projections, which check
    the shapes once (x: (M <= MAX_TOKENS, K) with unit column stride; out: (M, N) contiguous)."""
    with torch.cuda.device(x.device) if x.is_cuda and x.device.index != torch.cuda.current_device() \
            else contextlib.nullcontext():
        return plan.run(x, out)


# --------------------------------------------------------------------------------------------
# Plain-torch reference
# --------------------------------------------------------------------------------------------
def nf4_matmul_reference(x: torch.Tensor, base) -> torch.Tensor:
    """``x @ W^T`` with W dequantized to x's dtype, products and sums in fp32, rounded once."""
    W = dequantize_base(base, dtype=x.dtype)
    return (x.float() @ W.float().t()).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Compile specs (python -m nbtune.kernels.compile_check nf4_matmul)
# --------------------------------------------------------------------------------------------
def compile_specs():
    """fp16 and bf16 tokens over nested blocksize-64 weights (bnb's default), whole and split K,
    plus fp32 tokens and plain absmax, with the host's launch options; bf16 skips sm_75 (a T4
    computes in fp16)."""
    from .compile_check import CompileSpec

    constexpr_names = ("BLOCK_M", "BLOCK_N", "BLOCKSIZE", "NESTED", "ROUND_DTYPE", "DTYPE", "PARTIAL", "INTERPRETER")
    specs = []
    for name, dtype in (("fp16", tl.float16), ("bf16", tl.bfloat16), ("fp32", tl.float32)):
        for nested, partial in ((True, False), (True, True), (False, False)):
            signature = {"x_ptr": f"*{name}", "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
                         "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32", "nf4_ptr": "*fp32",
                         "out_ptr": "*fp32" if partial else f"*{name}", "M": "i32", "N": "i32", "K": "i32",
                         "stride_xm": "i32", "blocksize2": "i32", "blocks_per_split": "i32",
                         **{c: "constexpr" for c in constexpr_names}}
            specs.append(CompileSpec(
                name=f"nf4_matmul_{name}_{'nested' if nested else 'plain'}{'_split_k' if partial else ''}",
                fn=_nf4_matmul_kernel, signature=signature,
                constexprs=dict(BLOCK_M=16, BLOCK_N=BLOCK_N, BLOCKSIZE=64, NESTED=nested, ROUND_DTYPE=dtype,
                                DTYPE=dtype, PARTIAL=partial, INTERPRETER=False),
                targets=(80, 90) if name == "bf16" else (75, 80, 90),
                options=dict(num_warps=4, enable_fp_fusion=False)))
    return specs
