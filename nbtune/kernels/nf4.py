"""NF4 dequantization of bitsandbytes 4-bit weights, bit-identical to ``bitsandbytes``.

What it reads: bitsandbytes' packed NF4 layout, so ``Params4bit`` weights, pre-quantized bnb-4bit
checkpoints and ``Linear4bit`` modules work unchanged.

- ``weight``: uint8 (or any ``quant_storage`` dtype, reinterpreted as bytes), ``ceil(n / 2)`` bytes
  for ``n = prod(quant_state.shape)`` values taken in row-major order; byte ``j`` holds value ``2j``
  in its HIGH nibble and value ``2j + 1`` in its low nibble. ``Params4bit`` stores it as
  ``(ceil(n / 2), 1)``.
- ``quant_state.absmax``: one scale per ``blocksize`` consecutive values (blocks run over the
  flattened tensor and may straddle rows). Either fp32 (plain) or, with double quantization
  (``quant_state.nested``), uint8 codes into ``state2.code`` (256 fp32 entries) scaled per
  ``state2.blocksize`` codes by ``state2.absmax`` (fp32), plus the scalar ``quant_state.offset``.

The math, in the order and precision bitsandbytes uses (CUDA kernel and CPU backend alike):

    absmax[b] = fp32(fp32(code2[qabsmax[b]] * absmax2[b // blocksize2]) + offset)   (nested)
    value[i]  = dtype(fp32(NF4[nibble(i)] * absmax[i // blocksize]))

with ``NF4`` the fixed 16-entry NormalFloat table (bnb hard-codes it in its kernels and ignores
``quant_state.code``; so does this module), every product rounded to fp32 and the nested
``* + offset`` rounded twice: the Triton kernel is compiled with ``enable_fp_fusion=False`` so
the compiler cannot contract it into one FMA, which would round once and differ in the last bit.

(bnb's CPU backend 0.50.2 has one exception: on AVX-512 machines its NF4 kernel indexes absmax
per row, which is wrong when the last dimension is not a multiple of blocksize, e.g. (33, 96) at
blocksize 64; this module keeps the flat blocks that quantize_4bit and bnb's CUDA kernel use.)

The Triton kernel fuses the three launches bitsandbytes makes for a double-quantized weight (a
kernel that expands the uint8 absmax into a temporary fp32 buffer, a torch add of ``offset`` on
it, then the NF4 kernel) into one pass: each program decodes its own blocks' scales in registers
(one uint8 code, one ``absmax2`` load and one table lookup per block of 64 values) and then its
nibbles. No fp32 absmax buffer is allocated, written and read back (three passes over 4 bytes
per block), and the offset is read on the device (no host sync). Traffic is the minimum: packed
bytes + absmax bytes read once, the dense weight written once.

Nothing here is differentiable: base weights are frozen, the packed codes are integers and no
gradient ever flows into them, so there is no ``torch.autograd.Function`` and no backward.
A LoRA layer's backward needs ``W`` itself (dX = dY @ W), which it gets by calling this again.

``dequantize_base`` is what the LoRA kernels call to get the dense ``W`` of a base layer in any
form (``Params4bit``, ``Linear4bit``, ``nn.Linear``, plain tensor); 16-bit bases come back as they
are, without a copy.
"""
from __future__ import annotations

import contextlib
from math import prod

import torch

from ._backend import HAS_TRITON, interpreting, kernel_mode, use_triton
from ._launch import Relauncher, launch

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["nf4_dequantize", "nf4_dequantize_reference", "dequantize_base", "NF4_CODE_VALUES"]

# The NormalFloat-4 table (QLoRA, Dettmers et al. 2023): code k -> NF4_CODE_VALUES[k]. These are
# the float32 values bitsandbytes hard-codes in its CUDA and CPU kernels (printed exactly, so the
# double -> float32 conversion is exact).
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_nf4_tables: dict = {}


def _nf4_table(device: torch.device) -> torch.Tensor:
    """The NF4 table as a cached fp32 tensor on ``device`` (64 bytes, made once per device)."""
    key = (device.type, device.index)
    table = _nf4_tables.get(key)
    if table is None:
        table = _nf4_tables[key] = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)
    return table


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _round_fp32_to(x, DTYPE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        """fp32 -> DTYPE, round to nearest even. On GPUs ``.to()`` is exactly that; Triton's
        interpreter rounds fp32 -> bf16 half-up without carrying into the exponent, so there
        the rounding is done on the bits: add 0x7FFF plus the kept lowest bit, keep the top 16
        (exact RNE for every finite value, overflow to inf included)."""
        if BF16_BY_BITS and DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)

    @triton.jit
    def round_twice(x, ROUND_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        """fp32 -> quant_state.dtype (bnb's result) -> out dtype (a `.to()` of it), as one step
        when the two are the same."""
        if OUT_DTYPE == ROUND_DTYPE:
            return _round_fp32_to(x, OUT_DTYPE, BF16_BY_BITS)
        else:
            y = _round_fp32_to(x, ROUND_DTYPE, BF16_BY_BITS).to(tl.float32)
            return _round_fp32_to(y, OUT_DTYPE, BF16_BY_BITS)

    @triton.jit
    def block_scales(blocks, block_ok, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocksize2,
                     NESTED: tl.constexpr):
        """The fp32 scale of each quantization block in ``blocks``: its absmax, or for a nested
        state code2[qabsmax] * absmax2[block // blocksize2] + offset, rounded to fp32 after the
        product and after the sum as bnb's blockwise kernel + torch add do (the kernels that call
        this are compiled with enable_fp_fusion=False, so no FMA contracts the two)."""
        if NESTED:
            absmax_code = tl.load(absmax_ptr + blocks, mask=block_ok, other=0).to(tl.int32)
            absmax2 = tl.load(absmax2_ptr + blocks // blocksize2, mask=block_ok, other=0.0).to(tl.float32)
            code2 = tl.load(code2_ptr + absmax_code).to(tl.float32)
            offset = tl.load(offset_ptr).to(tl.float32)
            scaled = code2 * absmax2
            return scaled + offset
        else:
            return tl.load(absmax_ptr + blocks, mask=block_ok, other=0.0).to(tl.float32)

    @triton.jit
    def _nf4_dequantize_kernel(
        packed_ptr,  # uint8 [n_pairs]: value 2j in the high nibble of byte j, 2j+1 in the low one
        absmax_ptr,  # [n_blocks]: fp32/fp16/bf16 scales, or uint8 codes into code2 when NESTED
        absmax2_ptr,  # fp32 [ceil(n_blocks / blocksize2)] (NESTED only)
        code2_ptr,  # fp32 [256] (NESTED only)
        offset_ptr,  # fp32 [1] (NESTED only)
        nf4_ptr,  # fp32 [16]: the NF4 table
        out_pairs_ptr,  # [n_pairs] int32 (16-bit output) or int64 (fp32): the output, two values a word
        n_pairs,
        n_blocks,
        blocksize2,
        BLOCKSIZE: tl.constexpr,  # values per absmax (a power of two >= 2)
        ROWS: tl.constexpr,  # quantization blocks per program (a power of two)
        NESTED: tl.constexpr,
        ROUND_DTYPE: tl.constexpr,  # quant_state.dtype: bnb rounds to it before any cast to out's
        OUT_DTYPE: tl.constexpr,  # the output's element type
        BF16_BY_BITS: tl.constexpr,  # round to bf16 with integer ops (Triton's interpreter only)
    ):
        """Dequantize ROWS consecutive quantization blocks: a [ROWS, BLOCKSIZE] tile of the output.

        Fuses the decode of double-quantized absmax (uint8 code -> code2 table -> * absmax2 +
        offset, in fp32, rounded after the product and after the sum, like bnb's two kernels)
        with the NF4 decode of the packed nibbles. Each block's scale is computed once and
        broadcast along its row of the tile. One packed byte holds two consecutive values, so
        the output is written as words of two values (int32 for fp16/bf16, int64 for fp32): the
        [ROWS, BLOCKSIZE/2] tile of bytes maps one to one onto a tile of words, and both the
        loads and the stores are contiguous and vectorised (no interleaving shuffle).
        Reads packed bytes + absmax once, writes the output once; no temporary.
        No backward (frozen weights; see the module docstring).
        """
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid = tl.program_id(0)
        blocks = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # quantization block ids
        block_ok = blocks < n_blocks
        absmax = block_scales(blocks, block_ok, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocksize2, NESTED)

        pair_idx = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte j = output pair j
        pair_ok = pair_idx < n_pairs
        packed = tl.load(packed_ptr + pair_idx, mask=pair_ok, other=0).to(tl.int32)
        first = tl.load(nf4_ptr + (packed >> 4)) * absmax[:, None]  # values 2j (fp32 products)
        second = tl.load(nf4_ptr + (packed & 15)) * absmax[:, None]  # values 2j + 1
        first = round_twice(first, ROUND_DTYPE, OUT_DTYPE, BF16_BY_BITS)
        second = round_twice(second, ROUND_DTYPE, OUT_DTYPE, BF16_BY_BITS)
        if OUT_DTYPE == tl.float32:  # little-endian: value 2j is the low half of word j
            word = first.to(tl.uint32, bitcast=True).to(tl.uint64) | (
                second.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
            tl.store(out_pairs_ptr + pair_idx, word.to(tl.int64, bitcast=True), mask=pair_ok)
        else:
            word = first.to(tl.uint16, bitcast=True).to(tl.uint32) | (
                second.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
            tl.store(out_pairs_ptr + pair_idx, word.to(tl.int32, bitcast=True), mask=pair_ok)

_TL_DTYPES = {}
if HAS_TRITON:
    _TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _launch_config(n_elements: int, blocksize: int) -> tuple[int, int]:
    """(ROWS, num_warps): ~8192 values per program on big weights (32 per thread at 8 warps,
    i.e. 16 packed bytes in and 64 bytes out of fp16), fewer on small ones so that small
    tensors still spread over the SMs."""
    if interpreting():  # Triton's interpreter pays per program, not per element: few big ones
        per_program, num_warps = 1 << 15, 4
    elif n_elements >= (1 << 23):
        per_program, num_warps = 8192, 8
    elif n_elements >= (1 << 18):
        per_program, num_warps = 4096, 4
    else:
        per_program, num_warps = 1024, 4
    rows = max(1, per_program // blocksize)
    return rows, num_warps


def _second_level(quant_state, device) -> tuple[tuple, int]:
    """The kernel's (absmax2, code2, offset) arguments and blocksize2 for a nested (double-quantized)
    state; for a plain one, placeholders the kernel never reads and blocksize2 = 1."""
    if not quant_state.nested:
        return (quant_state.absmax.contiguous(),) * 3, 1
    state2 = quant_state.state2
    offset = quant_state.offset
    if torch.is_tensor(offset):
        offset = offset.to(device=device, dtype=torch.float32)  # a no-op for bnb's own states
    else:
        offset = torch.tensor(float(offset), dtype=torch.float32, device=device)
    return (state2.absmax.contiguous(), state2.code.contiguous(), offset.reshape(1).contiguous()), int(state2.blocksize)


def _nf4_dequantize_triton(packed: torch.Tensor, quant_state, out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel into ``out`` (contiguous). Odd sizes or an ``out`` not aligned to a
    word of two values go through an even-sized buffer (rare: both weight dims odd)."""
    n = out.numel()
    n_pairs = (n + 1) // 2
    flat = out.view(-1)
    word_dtype = torch.int64 if out.dtype == torch.float32 else torch.int32
    if n % 2 == 0 and (flat.data_ptr() % word_dtype.itemsize) == 0:
        target = flat
    else:
        target = torch.empty(2 * n_pairs, dtype=out.dtype, device=out.device)
    blocksize = int(quant_state.blocksize)
    n_blocks = -(-n // blocksize)
    device = packed.device
    extra, blocksize2 = _second_level(quant_state, device)
    rows, num_warps = _launch_config(n, blocksize)
    grid = (triton.cdiv(n_blocks, rows),)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        launch(
            _nf4_dequantize_kernel, grid,
            packed,
            quant_state.absmax.contiguous(),
            *extra,
            _nf4_table(device),
            target.view(word_dtype),
            n_pairs,
            n_blocks,
            blocksize2,
            BLOCKSIZE=blocksize,
            ROWS=rows,
            NESTED=bool(quant_state.nested),
            ROUND_DTYPE=_TL_DTYPES[quant_state.dtype],
            OUT_DTYPE=_TL_DTYPES[out.dtype],
            BF16_BY_BITS=interpreting(),
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    if target is not flat:
        flat.copy_(target[:n])
    return out


# --------------------------------------------------------------------------------------------
# Plain-torch reference
# --------------------------------------------------------------------------------------------
def _dequantize_absmax_reference(quant_state) -> torch.Tensor:
    """fp32 per-block scales, computed as bitsandbytes does: for a nested state,
    ``dequantize_blockwise(absmax, state2)`` (fp32 product, then cast to state2.dtype), then
    ``+= offset``, then ``.float()``."""
    if not quant_state.nested:
        return quant_state.absmax.reshape(-1).float()
    state2 = quant_state.state2
    codes = quant_state.absmax.reshape(-1)
    scaled = state2.code.float()[codes.long()]
    n2, bs2 = scaled.numel(), int(state2.blocksize)
    pad = -n2 % bs2
    scaled = torch.nn.functional.pad(scaled, (0, pad)).view(-1, bs2) * state2.absmax.float().reshape(-1, 1)
    absmax = scaled.reshape(-1)[:n2].to(state2.dtype if state2.dtype is not None else torch.float32)
    absmax = absmax + quant_state.offset
    return absmax.float()


def nf4_dequantize_reference(weight: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch NF4 dequantization, the same function as :func:`nf4_dequantize`.

    Works on any device. Values are bit-identical to ``bitsandbytes.functional.dequantize_4bit``
    (fp32 products, one rounding to ``quant_state.dtype``). Not differentiable (integer input).
    """
    packed, out = _prepare(weight, quant_state, out)
    n = out.numel()
    if n == 0:
        return _bnb_shape_shim(weight, out)
    blocksize = int(quant_state.blocksize)
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1)[:n].long()
    values = _nf4_table(packed.device)[codes]
    absmax = _dequantize_absmax_reference(quant_state).to(packed.device)
    pad = -n % blocksize
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize) * absmax[: (n + pad) // blocksize, None]
    values = values.reshape(-1)[:n].to(quant_state.dtype)
    out.view(-1).copy_(values)  # a second cast when out.dtype != quant_state.dtype, as `.to()` would
    return _bnb_shape_shim(weight, out)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _prepare(weight: torch.Tensor, quant_state, out: torch.Tensor | None):
    """Validate the state and return (packed uint8 bytes, flat view, contiguous) and the output."""
    if quant_state is None:
        raise ValueError("nf4_dequantize needs the weight's bitsandbytes QuantState (quant_state=None)")
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type != "nf4":
        raise ValueError(f"nbtune dequantizes NF4 only; this weight is quant_type={quant_type!r} "
                         "(use bitsandbytes.functional.dequantize_4bit for fp4)")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("this weight was repacked by bitsandbytes for its CPU inference kernel "
                         "(quant_state.packing_format_for_cpu); nbtune reads the standard NF4 layout only")
    if quant_state.dtype not in _OUT_DTYPES:
        raise ValueError(f"quant_state.dtype must be fp16, bf16 or fp32, got {quant_state.dtype}")
    blocksize = int(quant_state.blocksize)
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize}")
    shape = tuple(quant_state.shape)
    n = prod(shape)
    if isinstance(weight, torch.nn.Parameter):  # e.g. Params4bit: read its plain data tensor
        weight = weight.data
    packed = weight if weight.dtype == torch.uint8 else weight.contiguous().view(torch.uint8)
    packed = packed.contiguous().reshape(-1)
    if packed.numel() < (n + 1) // 2:
        raise ValueError(f"weight holds {packed.numel()} bytes, shape {list(shape)} needs {(n + 1) // 2}")
    n_blocks = -(-n // blocksize)
    if quant_state.absmax.numel() < n_blocks:
        raise ValueError(f"absmax holds {quant_state.absmax.numel()} scales, {n_blocks} blocks need one each")
    if out is None:
        out = torch.empty(shape, dtype=quant_state.dtype, device=packed.device)
    else:
        if out.numel() != n or not out.is_contiguous() or out.dtype not in _OUT_DTYPES:
            raise ValueError(f"out must be a contiguous fp16/bf16/fp32 tensor of {n} elements, got "
                             f"{out.dtype} {list(out.shape)} contiguous={out.is_contiguous()}")
        if out.device != packed.device:
            raise ValueError(f"out is on {out.device}, weight on {packed.device}")
    return packed, out


def _bnb_shape_shim(weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # bitsandbytes' dequantize_4bit returns out.t() when the packed weight comes in the old
    # transposed (1, n/2) form; kept so that results match it in every case.
    if weight.dim() >= 1 and weight.shape[0] == 1 and out.dim() <= 2:
        return out.t()
    return out


def nf4_dequantize(weight: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense weight from a bitsandbytes NF4 weight: ``bitsandbytes.functional.dequantize_4bit``.

    weight: the packed codes (``Params4bit`` data, uint8 ``(ceil(n/2), 1)``; other
        ``quant_storage`` dtypes are read as bytes).
    quant_state: its ``bitsandbytes.functional.QuantState`` (plain or nested/double-quantized
        absmax, any power-of-two blocksize); ``quant_type`` must be ``"nf4"``.
    out: optional contiguous output of ``prod(quant_state.shape)`` elements. Its dtype may differ
        from ``quant_state.dtype``: the result is then bnb's result cast to ``out.dtype``
        (``dequantize_4bit(...).to(out.dtype)``, same bits) written in the same single pass.

    Returns a tensor of shape ``quant_state.shape`` and dtype ``quant_state.dtype`` (or ``out``),
    bit-identical to bitsandbytes. One fused Triton kernel on CUDA (nested absmax decoded in
    registers); the plain-torch reference elsewhere. Not differentiable: no backward exists or is
    needed (frozen base weights).
    """
    packed, out = _prepare(weight, quant_state, out)
    if out.numel() == 0:
        return _bnb_shape_shim(weight, out)
    # A nested state whose second level is not fp32 (never made by bnb's quantize_4bit) rounds
    # its absmax to that dtype first; only the reference does that.
    state2_fp32 = not quant_state.nested or quant_state.state2.dtype in (None, torch.float32)
    if state2_fp32 and use_triton(packed, out, quant_state.absmax):
        _nf4_dequantize_triton(packed, quant_state, out)
        return _bnb_shape_shim(weight, out)
    return nf4_dequantize_reference(weight, quant_state, out)


def dequantize_base(base, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out_features, in_features) weight of a base layer, in 16-bit (or ``dtype``).

    base: a ``bitsandbytes.nn.Params4bit`` (anything with a non-None ``.quant_state``), a module
    with a ``.weight`` (``bitsandbytes.nn.Linear4bit``, ``torch.nn.Linear``), or a plain tensor.

    - 4-bit: dequantized with :func:`nf4_dequantize` straight into ``dtype`` (default
      ``quant_state.dtype``); values equal ``dequantize_4bit(w, qs).to(dtype)`` bit for bit.
    - 16/32-bit: returned as is (the same tensor, no copy), or ``.to(dtype)`` when ``dtype`` is
      given and differs.

    Not differentiable in the 4-bit case (frozen weights); a plain tensor keeps its autograd
    history.
    """
    if isinstance(base, torch.nn.Module):
        weight = getattr(base, "weight", None)
        if weight is None:
            raise TypeError(f"{type(base).__name__} has no .weight to dequantize")
        module_state = getattr(base, "quant_state", None)
        if getattr(weight, "quant_state", None) is None and module_state is not None:
            # bnb keeps a copy of the state on Linear4bit; its weight can lose it (e.g. FSDP)
            return nf4_dequantize(weight.data, module_state, out=torch.empty(
                tuple(module_state.shape), dtype=dtype or module_state.dtype, device=weight.device))
        return dequantize_base(weight, dtype)
    if not torch.is_tensor(base):
        raise TypeError(f"dequantize_base expects a tensor, Params4bit or module, got {type(base).__name__}")
    quant_state = getattr(base, "quant_state", None)
    if quant_state is None:
        if base.dtype in (torch.uint8, torch.int8):
            raise ValueError("an integer weight without .quant_state: not a quantized Params4bit nbtune can read")
        return base if dtype is None or base.dtype == dtype else base.to(dtype)
    out_dtype = dtype or quant_state.dtype
    plan = _launch_plan(base, quant_state, out_dtype)
    if plan is not None:
        return plan.run()
    data = base.data if isinstance(base, torch.nn.Parameter) else base
    out = torch.empty(tuple(quant_state.shape), dtype=out_dtype, device=data.device)
    return nf4_dequantize(data, quant_state, out=out)


class _LaunchPlan:
    """Everything one weight's dequantization launch needs, checked and derived once.

    A training step dequantizes each 4-bit weight three times (forward, recompute, backward);
    the validation, offset handling, launch configuration and contiguity checks of
    :func:`nf4_dequantize` cost more host time than the kernel's ~40 µs of GPU time on an 8B
    layer, so :func:`dequantize_base` keeps them per (weight, output dtype) and only allocates
    the output and launches.
    """

    __slots__ = ("relaunch", "shape", "dtype", "device", "word_dtype")

    def __init__(self, packed, quant_state, out_dtype):
        n = prod(tuple(quant_state.shape))
        blocksize = int(quant_state.blocksize)
        n_blocks = -(-n // blocksize)
        device = packed.device
        extra, blocksize2 = _second_level(quant_state, device)
        rows, num_warps = _launch_config(n, blocksize)
        fixed = (packed, quant_state.absmax.contiguous(), *extra, _nf4_table(device))
        # the output (a fresh buffer each time) is the one argument that changes between launches
        self.relaunch = Relauncher(
            _nf4_dequantize_kernel, (triton.cdiv(n_blocks, rows),), (*fixed, None, n // 2, n_blocks, blocksize2),
            len(fixed), dict(BLOCKSIZE=blocksize, ROWS=rows, NESTED=bool(quant_state.nested),
                             ROUND_DTYPE=_TL_DTYPES[quant_state.dtype], OUT_DTYPE=_TL_DTYPES[out_dtype],
                             BF16_BY_BITS=False, num_warps=num_warps, enable_fp_fusion=False))
        self.shape, self.dtype, self.device = tuple(quant_state.shape), out_dtype, device
        self.word_dtype = torch.int64 if out_dtype == torch.float32 else torch.int32

    def run(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.relaunch(out.view(-1).view(self.word_dtype))
        return out


def _launch_plan(data: torch.Tensor, quant_state, out_dtype) -> _LaunchPlan | None:
    """The cached launch plan of a CUDA NF4 weight (kept on its QuantState), or None where the
    general path must run: not on CUDA or not the Triton path, an odd element count, a layout
    the general path reshapes or refuses. Keyed by the tensors' addresses, so a state moved or
    re-quantized in place gets a new plan."""
    cache = quant_state.__dict__.get("_nbtune_plans")
    if cache:  # the per-call path: one lookup (plans exist only for CUDA weights)
        plan = cache.get((out_dtype, data.data_ptr(), quant_state.absmax.data_ptr(), torch.cuda.current_device()))
        if plan is not None:
            return plan if kernel_mode() != "reference" else None
    if not (data.is_cuda and data.dtype == torch.uint8 and data.is_contiguous()) or interpreting():
        return None
    # no plan yet for this (weight, dtype, device): check once what the general path would refuse
    absmax = quant_state.absmax
    if not use_triton(data, absmax) or out_dtype not in _OUT_DTYPES or data.dim() == 0:
        return None
    if data.dim() >= 1 and data.shape[0] == 1 and len(tuple(quant_state.shape)) <= 2:
        return None  # bnb's old transposed packing: the general path returns out.t()
    _prepare(data.detach(), quant_state, None)  # validates: raises on what the kernel does not read
    n = prod(tuple(quant_state.shape))
    nested_fp32 = not quant_state.nested or quant_state.state2.dtype in (None, torch.float32)
    if n == 0 or n % 2 or not nested_fp32 or data.device.index != torch.cuda.current_device():
        return None
    key = (out_dtype, data.data_ptr(), absmax.data_ptr(), torch.cuda.current_device())
    flat = (data.data if isinstance(data, torch.nn.Parameter) else data).reshape(-1)
    return keep_plan(quant_state, "_nbtune_plans", key, _LaunchPlan(flat, quant_state, out_dtype))


def keep_plan(quant_state, name: str, key: tuple, plan):
    """Store a weight's launch plan in its QuantState's cache ``name`` under ``key`` = (variant,
    *where the weight's tensors are); the plans of the same weight at other addresses (moved,
    re-quantized in place) are dropped first, so a cache never holds stale tensors. Returns plan."""
    cache = quant_state.__dict__.setdefault(name, {})
    for stale in [k for k in cache if k[1:] != key[1:]]:
        del cache[stale]
    cache[key] = plan
    return plan


# --------------------------------------------------------------------------------------------
# Compile specs (python -m nbtune.kernels.compile_check nf4)
# --------------------------------------------------------------------------------------------
def compile_specs():
    """Every (output dtype, quant_state.dtype) pair on nested blocksize 64 (the bnb default), plus
    plain absmax and blocksizes 128 / 4096 for the same-dtype cases. bf16 variants skip sm_75,
    except fp16 output from a bf16 quant_state: that is a bf16 bnb-4bit checkpoint on a T4."""
    from .compile_check import CompileSpec

    types = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
    specs = []
    for out_name, out_tl in types.items():
        for round_name, round_tl in types.items():
            variants = [(True, 64)]
            if out_name == round_name:
                variants += [(False, 64), (True, 128), (True, 4096)]
            for nested, blocksize in variants:
                if "bf16" not in (out_name, round_name) or (out_name, round_name) == ("fp16", "bf16"):
                    targets = (75, 80, 90)
                else:
                    targets = (80, 90)
                specs.append(CompileSpec(
                    name=f"nf4_dequant_{out_name}_from_{round_name}_{'nested' if nested else 'plain'}_bs{blocksize}",
                    fn=_nf4_dequantize_kernel,
                    signature={
                        "packed_ptr": "*u8",
                        "absmax_ptr": "*u8" if nested else "*fp32",
                        "absmax2_ptr": "*fp32",
                        "code2_ptr": "*fp32",
                        "offset_ptr": "*fp32",
                        "nf4_ptr": "*fp32",
                        "out_pairs_ptr": "*i64" if out_name == "fp32" else "*i32",
                        "n_pairs": "i32",
                        "n_blocks": "i32",
                        "blocksize2": "i32",
                        "BLOCKSIZE": "constexpr",
                        "ROWS": "constexpr",
                        "NESTED": "constexpr",
                        "ROUND_DTYPE": "constexpr",
                        "OUT_DTYPE": "constexpr",
                        "BF16_BY_BITS": "constexpr",
                    },
                    constexprs={"BLOCKSIZE": blocksize, "ROWS": max(1, 8192 // blocksize), "NESTED": nested,
                                "ROUND_DTYPE": round_tl, "OUT_DTYPE": out_tl, "BF16_BY_BITS": False},
                    targets=targets,
                ))
    return specs
