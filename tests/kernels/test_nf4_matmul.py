"""nbtune.kernels.nf4_matmul: x @ W^T for a few tokens straight from an NF4 weight.

On CPU the Triton kernel runs in Triton's interpreter (``NBTUNE_KERNELS=triton``) and is compared
with the reference (W dequantized to x's dtype, fp32 products and sums), which in turn is tied to
bitsandbytes' own ``dequantize_4bit``; both the whole-K and the split-K launch are covered. The
LoRA projections take the kernel for decoding-sized inputs only. GPU tests compare it with
dequantize + cuBLAS at llama3-8b sizes.
"""
import importlib

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from nbtune.kernels import lora as lora_module  # noqa: E402
from nbtune.kernels.lora import lora_mlp, lora_mlp_reference, lora_qkv, lora_qkv_reference  # noqa: E402
from nbtune.kernels.nf4_matmul import MAX_TOKENS, k_split, nf4_matmul, nf4_matmul_reference, nf4_weight_of  # noqa: E402

mm_module = importlib.import_module("nbtune.kernels.nf4_matmul")  # the package attribute is the function
HAS_CUDA = torch.cuda.is_available()
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-2, atol=1e-3),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def nf4_base(n, k, dtype=torch.float16, nested=True, blocksize=64, device="cpu", seed=0):
    """A (n, k) NF4 weight as the LoRA kernels see a base: the packed bytes carrying .quant_state."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = (torch.randn((n, k), generator=gen, device=device) * 0.05).to(dtype)
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    packed.quant_state = state
    return packed


def tokens(m, k, dtype, device="cpu", seed=1):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((m, k), generator=gen, device=device).to(dtype)


def test_reference_is_x_times_bitsandbytes_dequantized_weight():
    base = nf4_base(40, 128)
    x = tokens(3, 128, torch.float16)
    W = F.dequantize_4bit(base, base.quant_state).to(torch.float16)
    torch.testing.assert_close(nf4_matmul_reference(x, base), (x.float() @ W.float().t()).half(), rtol=0, atol=0)


@pytest.fixture
def triton_cpu(kernel_mode):
    if HAS_CUDA:
        pytest.skip("the interpreter cases run on CPU machines; the GPU tests cover CUDA")
    kernel_mode("triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 5, MAX_TOKENS])
def test_kernel_matches_reference(triton_cpu, dtype, m):
    base = nf4_base(96, 256, dtype=dtype)
    x = tokens(m, 256, dtype)
    y = nf4_matmul(x, base)
    assert y.dtype == dtype and y.shape == (m, 96)
    torch.testing.assert_close(y, nf4_matmul_reference(x, base), **TOL[dtype])


@pytest.mark.parametrize("nested,blocksize", [(False, 64), (True, 128), (False, 256)])
def test_kernel_reads_plain_and_nested_scales_and_other_blocksizes(triton_cpu, nested, blocksize):
    base = nf4_base(70, 512, nested=nested, blocksize=blocksize, seed=3)
    x = tokens(4, 512, torch.float16)
    torch.testing.assert_close(nf4_matmul(x, base), nf4_matmul_reference(x, base), **TOL[torch.float16])


def test_split_k_sums_its_partials(triton_cpu, monkeypatch):
    """With more SMs than the output features fill, K is shared out over a second grid axis and the
    fp32 partial sums are reduced: the same result as one program per feature block."""
    base = nf4_base(96, 512, dtype=torch.bfloat16, seed=5)
    x = tokens(6, 512, torch.bfloat16)
    monkeypatch.setattr(mm_module, "_sm_count", lambda device: 1)
    whole = nf4_matmul(x, base)
    monkeypatch.setattr(mm_module, "_sm_count", lambda device: 8)
    assert k_split(96, 512 // 64, 8)[0] > 1
    split = nf4_matmul(x, base)
    torch.testing.assert_close(split, nf4_matmul_reference(x, base), **TOL[torch.bfloat16])
    torch.testing.assert_close(split.float(), whole.float(), rtol=1e-2, atol=1e-2)


def test_out_is_written_in_place(triton_cpu):
    base = nf4_base(64, 128)
    x = tokens(2, 128, torch.float16)
    out = torch.full((2, 64), float("nan"), dtype=torch.float16)
    assert nf4_matmul(x, base, out=out) is out
    torch.testing.assert_close(out, nf4_matmul_reference(x, base), **TOL[torch.float16])


def test_k_split_fills_the_gpu_and_keeps_every_block():
    """llama3-8b on a 132-SM H100: k/v (1024 out, 16 programs) and q/o (4096 out) split K until the
    grid has about two programs per SM; every split holds at least one block and all blocks are covered."""
    for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        programs, k_blocks = -(-n // mm_module.BLOCK_N), k // 64
        splits, per_split = k_split(n, k_blocks, 132)
        assert (splits - 1) * per_split < k_blocks <= splits * per_split
        assert programs * (splits + 1) > 2 * 132 > programs * (splits - 1)  # about two programs per SM
    assert k_split(1024, 4096 // 64, 132) == (16, 4)
    assert k_split(64, 1, 132) == (1, 1)


def test_which_weights_the_kernel_reads():
    assert nf4_weight_of(nf4_base(8, 128)) is not None
    assert nf4_weight_of(nf4_base(8, 96)) is None  # 64-value blocks straddle the 96-wide rows
    assert nf4_weight_of(nf4_base(8, 1024, blocksize=512)) is None  # wider blocks: dequantize + GEMM
    assert nf4_weight_of(torch.randn(8, 128)) is None  # a 16/32-bit base: the dense GEMM
    fp4, state = F.quantize_4bit(torch.randn(8, 128), quant_type="fp4")
    fp4.quant_state = state
    assert nf4_weight_of(fp4) is None


def test_plans_are_kept_per_weight_and_dropped_when_it_moves(triton_cpu):
    """One plan per (tokens' dtype, weight tensors, device) on the QuantState: another dtype adds one,
    the weight at new addresses replaces them all (its old tensors are not kept alive)."""
    base = nf4_base(64, 128)
    state = base.quant_state
    fp16 = mm_module.matmul_plan(base, torch.float16, base.device)
    assert mm_module.matmul_plan(base, torch.float16, base.device) is fp16
    mm_module.matmul_plan(base, torch.float32, base.device)
    assert len(state._nbtune_matmul) == 2
    moved = base.clone()
    moved.quant_state = state
    assert mm_module.matmul_plan(moved, torch.float16, base.device) is not fp16
    assert list(state._nbtune_matmul) == [(torch.float16, moved.data_ptr(), state.absmax.data_ptr(), base.device)]


def test_bad_input_is_named():
    base = nf4_base(8, 128)
    with pytest.raises(ValueError, match=r"x must be \(M <= 16, 128\)"):
        nf4_matmul(tokens(MAX_TOKENS + 1, 128, torch.float16), base)
    with pytest.raises(ValueError, match="NF4 weight"):
        nf4_matmul(tokens(2, 128, torch.float16), torch.randn(8, 128))


# ----------------------------------------------------------------------------- in the LoRA projections
def lora(n, k, r=4, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    A = (torch.randn((r, k), generator=gen) * 0.1).to(dtype)
    B = (torch.randn((n, r), generator=gen) * 0.1).to(dtype)
    return (nf4_base(n, k, dtype=dtype, seed=seed), A, B, 2.0)


@pytest.mark.parametrize("m,fused", [(3, True), (MAX_TOKENS + 1, False)])
def test_lora_projections_decode_through_the_kernel(triton_cpu, count_calls, m, fused):
    """Decoding-sized inputs (<= MAX_TOKENS tokens) take the NF4 matmul for every base projection,
    longer ones the dequantize + GEMM path; both match the fp32 reference."""
    calls = count_calls(lora_module, ["decode_product", "_weight"])
    q, k, v = lora(128, 128, seed=1), lora(64, 128, seed=2), lora(64, 128, seed=3)
    gate, up, down = lora(192, 128, seed=4), lora(192, 128, seed=5), lora(128, 192, seed=6)
    x = tokens(m, 128, torch.float16).view(1, m, 128)
    qkv, mlp = lora_qkv(x, q, k, v), lora_mlp(x, gate, up, down)
    assert calls == ({"decode_product": 6, "_weight": 0} if fused else {"decode_product": 0, "_weight": 6})
    for got, want in zip(qkv, lora_qkv_reference(x, q, k, v)):
        torch.testing.assert_close(got, want, **TOL[torch.float16])
    torch.testing.assert_close(mlp, lora_mlp_reference(x, gate, up, down), rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_kernel_matches_dequantize_and_cublas(dtype, n, k, m):
    """llama3-8b's projections at decoding batch sizes against dequantize_base + torch.mm."""
    from nbtune.kernels.nf4 import dequantize_base

    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    base = nf4_base(n, k, dtype=dtype, device="cuda")
    x = tokens(m, k, dtype, device="cuda")
    want = torch.mm(x, dequantize_base(base, dtype).t())
    torch.testing.assert_close(nf4_matmul(x, base), want, rtol=1e-2, atol=2e-2)
