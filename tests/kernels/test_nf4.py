"""nbtune.kernels.nf4 against bitsandbytes: bit-identical dequantization, both paths.

On CPU the reference path and the Triton kernel (in Triton's interpreter, forced with
``kernel_mode("triton")``) are compared with ``bitsandbytes.functional.dequantize_4bit`` (its CPU
backend) and with an independent numpy implementation of bnb's flat block layout. GPU tests
compare the Triton kernel with bnb's CUDA kernel at llama3-8b sizes.

Note on bnb's CPU backend (0.50.2): on AVX-512 machines its NF4 kernel indexes absmax per row
(``row * (cols // blocksize) + col // blocksize``), which is only right when ``cols`` is a
multiple of ``blocksize``; for e.g. (33, 96) at blocksize 64 it returns wrong values (its scalar
fallback, its default backend and its CUDA kernel all use flat blocks, as quantize_4bit does).
Those shapes are checked against the numpy oracle instead (and against CUDA in the GPU tests).
"""
from math import prod

import numpy as np
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from nbtune.kernels import nf4 as nf4_module  # noqa: E402
from nbtune.kernels._backend import interpreting  # noqa: E402
from nbtune.kernels.nf4 import NF4_CODE_VALUES, dequantize_base, nf4_dequantize, nf4_dequantize_reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (shape, blocksize) pairs where every bnb CPU code path is right: cols % blocksize == 0, or
# cols % 16 != 0 (scalar fallback). Odd row counts, a partial last block, several programs.
BNB_CPU_CASES = [((33, 64), 64), ((4096, 128), 64), ((7, 130), 64), ((5, 6), 64),
                 ((33, 128), 128), ((129, 256), 128), ((7, 130), 128)]
# Blocks straddling rows (bnb's AVX-512 CPU kernel gets these wrong), odd element counts,
# a last program only partly full.
FLAT_CASES = [((33, 96), 64), ((3, 5), 64), ((1000, 72), 64), ((17, 40), 128), ((1, 7), 64)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that equality is bit-exact (and NaN-safe)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    diff = (bits(actual.cpu()) != bits(expected.cpu()))
    assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} values differ, first at {diff.nonzero()[0].tolist()}"


def quantize(shape, dtype, nested, blocksize, device="cpu", seed=0, quant_storage=torch.uint8):
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
    return F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4",
                           quant_storage=quant_storage)


def numpy_dequantize(packed: torch.Tensor, qs) -> torch.Tensor:
    """Independent oracle of bnb's semantics: flat blocks, high nibble first, fp32 products."""
    n = prod(qs.shape)
    p = packed.cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
    codes = np.empty(2 * p.size, dtype=np.uint8)
    codes[0::2], codes[1::2] = p >> 4, p & 15
    codes = codes[:n]
    n_blocks = -(-n // qs.blocksize)
    if qs.nested:
        s2 = qs.state2
        absmax = s2.code.cpu().numpy()[qs.absmax.cpu().numpy()] * np.repeat(s2.absmax.cpu().numpy(), s2.blocksize)[:n_blocks]
        absmax = (absmax + np.float32(qs.offset.item())).astype(np.float32)
    else:
        absmax = qs.absmax.cpu().numpy()
    assert absmax.dtype == np.float32
    values = np.asarray(NF4_CODE_VALUES, dtype=np.float32)[codes] * np.repeat(absmax, qs.blocksize)[:n]
    assert values.dtype == np.float32
    return torch.from_numpy(values).to(qs.dtype).reshape(tuple(qs.shape))


@pytest.fixture
def triton_device(kernel_mode):
    """Where the Triton path runs: CUDA when present, else the CPU under Triton's interpreter."""
    if HAS_CUDA:
        return "cuda"
    if not interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET unset: the Triton path cannot run")
    kernel_mode("triton")
    return "cpu"


# ------------------------------------------------------------------------------ the table
def test_nf4_table_is_bitsandbytes_table():
    ours = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)
    assert_bit_equal(ours, F.get_4bit_type("nf4", device="cpu").float())
    assert_bit_equal(nf4_module._nf4_table(torch.device("cpu")), ours)


# ------------------------------------------------------------------------------ reference path
@pytest.mark.parametrize("shape,blocksize", BNB_CPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_reference_bit_identical_to_bnb_cpu(shape, blocksize, dtype, nested, kernel_mode):
    kernel_mode("reference")
    packed, qs = quantize(shape, dtype, nested, blocksize, seed=hash((shape, blocksize)) % 1000)
    expected = F.dequantize_4bit(packed, qs)
    assert_bit_equal(nf4_dequantize(packed, qs), expected)
    assert_bit_equal(nf4_dequantize_reference(packed, qs), expected)


@pytest.mark.parametrize("shape,blocksize", FLAT_CASES)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_reference_flat_blocks_match_oracle(shape, blocksize, nested, kernel_mode):
    kernel_mode("reference")
    for dtype in DTYPES:
        packed, qs = quantize(shape, dtype, nested, blocksize, seed=7)
        assert_bit_equal(nf4_dequantize(packed, qs), numpy_dequantize(packed, qs))


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_oracle_agrees_with_bnb_cpu(nested):
    for (shape, blocksize), dtype in zip(BNB_CPU_CASES, DTYPES * 3):
        packed, qs = quantize(shape, dtype, nested, blocksize, seed=3)
        assert_bit_equal(numpy_dequantize(packed, qs), F.dequantize_4bit(packed, qs))


# ------------------------------------------------------------------------------ Triton path
@pytest.mark.parametrize("shape,blocksize", BNB_CPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_triton_bit_identical_to_bnb(shape, blocksize, dtype, nested, triton_device):
    packed, qs = quantize(shape, dtype, nested, blocksize, device=triton_device, seed=shape[0] * 7 + DTYPES.index(dtype))
    assert_bit_equal(nf4_dequantize(packed, qs), F.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("shape,blocksize", FLAT_CASES)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_triton_flat_blocks_match_oracle(shape, blocksize, nested, triton_device):
    for dtype in DTYPES:
        packed, qs = quantize(shape, dtype, nested, blocksize, device=triton_device, seed=11)
        out = nf4_dequantize(packed, qs)
        assert_bit_equal(out, numpy_dequantize(packed, qs))
        if triton_device == "cuda":
            assert_bit_equal(out, F.dequantize_4bit(packed, qs))


def test_triton_path_is_taken(triton_device, monkeypatch):
    """The triton mode really launches the kernel (and reference mode does not)."""
    packed, qs = quantize((33, 64), torch.float16, True, 64, device=triton_device)
    calls = []
    real = nf4_module._nf4_dequantize_triton
    monkeypatch.setattr(nf4_module, "_nf4_dequantize_triton", lambda *a: calls.append(1) or real(*a))
    nf4_dequantize(packed, qs)
    assert calls == [1]
    monkeypatch.setenv("NBTUNE_KERNELS", "reference")
    nf4_dequantize(packed, qs)
    assert calls == [1]


# ------------------------------------------------------------------------------ out=, storage, errors
@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("qs_dtype", DTYPES, ids=str)
def test_out_of_another_dtype_is_bnb_result_cast(path, qs_dtype, kernel_mode):
    if path == "triton" and not (HAS_CUDA or interpreting()):
        pytest.skip("Triton path unavailable")
    kernel_mode(path if not HAS_CUDA else "auto")
    device = "cuda" if (HAS_CUDA and path == "triton") else "cpu"
    packed, qs = quantize((65, 64), qs_dtype, True, 64, device=device, seed=5)
    expected = F.dequantize_4bit(packed, qs)
    for out_dtype in DTYPES:
        out = torch.full(tuple(qs.shape), float("nan"), dtype=out_dtype, device=device)
        result = nf4_dequantize(packed, qs, out=out)
        assert result.data_ptr() == out.data_ptr()
        assert_bit_equal(out, expected.to(out_dtype))


def test_triton_unaligned_and_odd_out(triton_device):
    """An out that starts mid-word, and an odd element count, go through the even buffer."""
    packed, qs = quantize((16, 64), torch.bfloat16, True, 64, device=triton_device, seed=2)
    expected = F.dequantize_4bit(packed, qs)
    backing = torch.zeros(16 * 64 + 1, dtype=torch.bfloat16, device=triton_device)
    out = backing[1:].view(16, 64)
    assert out.data_ptr() % 4 != 0
    nf4_dequantize(packed, qs, out=out)
    assert_bit_equal(out, expected)
    assert backing[0].item() == 0  # nothing written before out

    packed, qs = quantize((3, 5), torch.float16, False, 64, device=triton_device, seed=2)
    backing = torch.zeros(16, dtype=torch.float16, device=triton_device)
    nf4_dequantize(packed, qs, out=backing[:15].view(3, 5))
    assert_bit_equal(backing[:15].view(3, 5), numpy_dequantize(packed, qs))
    assert (backing[15:] == 0).all()  # nothing written past out


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_non_uint8_quant_storage_and_transposed_packing(path, kernel_mode):
    if path == "triton" and not (HAS_CUDA or interpreting()):
        pytest.skip("Triton path unavailable")
    kernel_mode(path if not HAS_CUDA else "auto")
    device = "cuda" if (HAS_CUDA and path == "triton") else "cpu"
    packed, qs = quantize((32, 64), torch.bfloat16, True, 64, device=device, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert_bit_equal(nf4_dequantize(packed, qs), F.dequantize_4bit(packed, qs))
    # The old transposed (1, n/2) packing: bnb returns out.t(); so do we.
    packed, qs = quantize((32, 64), torch.float16, False, 64, device=device)
    flat = packed.view(1, -1)
    expected = F.dequantize_4bit(flat, qs)
    assert expected.shape == (64, 32)
    assert_bit_equal(nf4_dequantize(flat, qs), expected)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_rejects_what_it_cannot_read(path, kernel_mode):
    kernel_mode(path)
    packed, qs = F.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="NF4 only"):
        nf4_dequantize(packed, qs)
    packed, qs = quantize((8, 64), torch.float16, False, 64)
    with pytest.raises(ValueError, match="out must be"):
        nf4_dequantize(packed, qs, out=torch.empty(8, 63, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        nf4_dequantize(packed, qs, out=torch.empty(64, 8, dtype=torch.float16).t())
    with pytest.raises(ValueError, match="bytes"):
        nf4_dequantize(packed[:10], qs)
    with pytest.raises(ValueError, match="QuantState"):
        nf4_dequantize(packed, None)


# ------------------------------------------------------------------------------ dequantize_base
def test_dequantize_base_16bit_forms_are_not_copied():
    linear = torch.nn.Linear(64, 33, bias=False).to(torch.float16)
    w = dequantize_base(linear)
    assert w is linear.weight
    assert dequantize_base(linear, torch.float16) is linear.weight
    as_bf16 = dequantize_base(linear, torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, linear.weight.to(torch.bfloat16))
    plain = torch.randn(33, 64, dtype=torch.bfloat16)
    assert dequantize_base(plain) is plain
    assert dequantize_base(plain, torch.bfloat16) is plain
    assert torch.equal(dequantize_base(plain, torch.float32), plain.float())


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_dequantize_base_params4bit_and_linear4bit(path, kernel_mode):
    if path == "triton" and not (HAS_CUDA or interpreting()):
        pytest.skip("Triton path unavailable")
    kernel_mode(path if not HAS_CUDA else "auto")
    device = "cuda" if (HAS_CUDA and path == "triton") else "cpu"
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 33, bias=False, compute_dtype=torch.float16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight.data = (torch.randn(33, 64) * 0.02).to(torch.bfloat16)
    layer = layer.to(device)
    qs = layer.weight.quant_state
    assert layer.weight.dtype == torch.uint8 and qs.nested and qs.dtype == torch.bfloat16
    expected = F.dequantize_4bit(layer.weight, qs)
    assert_bit_equal(dequantize_base(layer), expected)
    assert_bit_equal(dequantize_base(layer.weight), expected)
    assert_bit_equal(dequantize_base(layer, torch.float16), expected.to(torch.float16))  # T4: bf16 ckpt -> fp16
    # A Params4bit on its own, not yet quantized: still 16-bit, returned as is.
    raw = bnb.nn.Params4bit(torch.randn(16, 64, dtype=torch.float16), quant_type="nf4")
    assert dequantize_base(raw) is raw
    quantized = raw.to(device)
    assert_bit_equal(dequantize_base(quantized), F.dequantize_4bit(quantized, quantized.quant_state))


def test_dequantize_base_rejects_unknown_forms():
    with pytest.raises(ValueError, match="quant_state"):
        dequantize_base(torch.zeros(8, 1, dtype=torch.uint8))
    with pytest.raises(TypeError):
        dequantize_base(torch.nn.ReLU())
    with pytest.raises(TypeError):
        dequantize_base([1, 2, 3])


# ------------------------------------------------------------------------------ GPU
GPU_SIZES = [(4096, 14336), (14336, 4096), (1024, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_llama_sizes_bit_identical_to_bnb_cuda(shape, dtype):
    packed, qs = quantize(shape, dtype, True, 64, device="cuda", seed=1)
    assert_bit_equal(nf4_dequantize(packed, qs), F.dequantize_4bit(packed, qs))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_vocab_size_lm_head(dtype):
    packed, qs = quantize((128256, 4096), dtype, True, 64, device="cuda", seed=4)
    out = nf4_dequantize(packed, qs)
    expected = F.dequantize_4bit(packed, qs)
    assert torch.equal(bits(out), bits(expected))


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", [64, 128, 256, 4096])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_blocksizes_and_odd_shapes(blocksize, nested, dtype):
    for shape in [(4096, 4096), (33, 96), (3, 5), (1000, 72), (4097, 129)]:
        packed, qs = quantize(shape, dtype, nested, blocksize, device="cuda", seed=shape[0])
        assert_bit_equal(nf4_dequantize(packed, qs), F.dequantize_4bit(packed, qs))


@pytest.mark.gpu
def test_gpu_into_out_allocates_nothing():
    """The fused kernel needs no temporary (no fp32 absmax buffer): only `out` is written."""
    packed, qs = quantize((14336, 4096), torch.float16, True, 64, device="cuda", seed=9)
    out = torch.empty(tuple(qs.shape), dtype=torch.float16, device="cuda")
    nf4_dequantize(packed, qs, out=out)  # warm-up: compile, NF4 table
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    nf4_dequantize(packed, qs, out=out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before == 0
    assert_bit_equal(out, F.dequantize_4bit(packed, qs))
