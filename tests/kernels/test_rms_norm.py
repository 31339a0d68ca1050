"""nbtune.kernels.rms_norm: the Triton kernels (Triton's interpreter on CPU, CUDA on the GPU machine)
and the reference, against fp64 math and against transformers' Llama / Gemma / Gemma3 RMSNorm."""
import importlib

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

# The module shares its name with the function: `nbtune.kernels.rms_norm` is whichever was bound
# last, so the tests take the module by name and the function from it.
M = importlib.import_module("nbtune.kernels.rms_norm")
rms_norm = M.rms_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Triton-vs-fp64 tolerances. bf16 is loose by one bf16 ulp: the interpreter rounds fp32 -> bf16
# toward zero (the GPU rounds to nearest).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# Triton vs the reference in the same dtype (the same roundings except the last one): 1-2 ulp.
SAME_DTYPE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
                  torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _gen(*key):
    return torch.Generator().manual_seed(hash(key) % (2**31))


def _inputs(shape, dtype, w_dtype=None, offset=0.0, seed=0, device="cpu"):
    g = _gen(shape, str(dtype), str(w_dtype), offset, seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype)
    w_center = 0.0 if offset else 1.0  # Gemma stores w around 0 (used as 1 + w)
    w = (w_center + 0.2 * torch.randn(shape[-1], generator=g)).to(w_dtype or dtype)
    dy = torch.randn(shape, generator=g).to(torch.promote_types(dtype, w.dtype) if not offset else dtype)
    return x.to(device), w.to(device), dy.to(device)


def _fp64_reference(x, w, dy, eps, offset, grad_w=True):
    """Forward, dx, dw of the exact math in fp64 on upcast inputs (no intermediate roundings)."""
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_(grad_w)
    y = M.rms_norm_reference(xr, wr, eps, offset, casting="gemma")  # gemma casting in fp64 = exact math
    y.backward(dy.double())
    return y.detach(), xr.grad, wr.grad


def _run(x, w, dy, eps, offset, casting=None, fn=rms_norm):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, eps, offset, casting)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


# ---------------------------------------------------------------------------------------------
# reference == transformers' modules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hf_cls,offset", [(LlamaRMSNorm, 0.0), (GemmaRMSNorm, 1.0), (Gemma3RMSNorm, 1.0)])
def test_reference_is_transformers_module(kernel_mode, hf_cls, offset, dtype):
    kernel_mode("reference")
    x, w, dy = _inputs((3, 5, 100), dtype, offset=offset, seed=1)
    module = hf_cls(100, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(w)
    xm = x.clone().requires_grad_()
    y_hf = module(xm)
    y_hf.backward(dy.to(y_hf.dtype))
    y, dx, dw = _run(x, w, dy.to(y_hf.dtype), 1e-5, offset)
    assert y.dtype == y_hf.dtype
    assert torch.equal(y, y_hf.detach())  # same ops in the same order: bit for bit
    torch.testing.assert_close(dx, xm.grad, rtol=0, atol=0)
    torch.testing.assert_close(dw, module.weight.grad, rtol=0, atol=0)


def test_reference_fp32_weight_with_half_input_returns_fp32_like_llama(kernel_mode):
    """peft's prepare_model_for_kbit_training leaves fp32 norm weights in an fp16 model."""
    kernel_mode("reference")
    x, w, _ = _inputs((2, 3, 64), torch.float16, w_dtype=torch.float32, seed=2)
    module = LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(w)
    y = rms_norm(x, w)
    assert y.dtype == torch.float32
    assert torch.equal(y, module(x))


def test_casting_argument_is_validated():
    x, w, _ = _inputs((2, 8), torch.float32)
    with pytest.raises(ValueError, match="casting"):
        rms_norm(x, w, casting="t5")
    with pytest.raises(ValueError, match="does not fit"):
        rms_norm(x, w[:4])


def test_auto_mode_on_cpu_runs_the_reference(kernel_mode):
    kernel_mode("auto")
    x, w, _ = _inputs((4, 33), torch.float16, seed=3)
    y = rms_norm(x, w)
    assert y.grad_fn is None and torch.equal(y, M.rms_norm_reference(x, w))


# ---------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU)
# ---------------------------------------------------------------------------------------------
SHAPES = [(1, 7, 33), (3, 5, 100), (2, 3, 576), (4, 1000), (130, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_forward_backward(kernel_mode, shape, offset, dtype):
    kernel_mode("triton")
    eps = 1e-6
    x, w, dy = _inputs(shape, dtype, offset=offset, seed=4)
    y, dx, dw = _run(x, w, dy, eps, offset)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype and y.shape == x.shape
    # 1) the same roundings as the matching transformers module (reference in the input dtype)
    y_same, _, _ = _run(x, w, dy, eps, offset, fn=M.rms_norm_reference)
    torch.testing.assert_close(y, y_same, **SAME_DTYPE_TOL[dtype])
    # 2) the exact math, on upcast inputs
    y64, dx64, dw64 = _fp64_reference(x, w, dy, eps, offset)
    torch.testing.assert_close(y.double(), y64, **TOL[dtype])
    torch.testing.assert_close(dx.double(), dx64, **TOL[dtype])
    dw_scale = max(1.0, dw64.abs().max().item())
    torch.testing.assert_close(dw.double() / dw_scale, dw64 / dw_scale, **TOL[dtype])


@pytest.mark.parametrize("casting", ["llama", "gemma"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_triton_explicit_casting(kernel_mode, casting, offset):
    kernel_mode("triton")
    x, w, dy = _inputs((3, 5, 100), torch.float16, offset=offset, seed=5)
    y, dx, dw = _run(x, w, dy, 1e-6, offset, casting)
    y_ref, dx_ref, dw_ref = _run(x, w, dy, 1e-6, offset, casting, fn=M.rms_norm_reference)
    torch.testing.assert_close(y, y_ref, **SAME_DTYPE_TOL[torch.float16])
    torch.testing.assert_close(dx, dx_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("hf_cls,offset", [(LlamaRMSNorm, 0.0), (Gemma3RMSNorm, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_transformers_module(kernel_mode, hf_cls, offset, dtype):
    kernel_mode("triton")
    x, w, dy = _inputs((2, 9, 96), dtype, offset=offset, seed=6)
    module = hf_cls(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(w)
    xm = x.clone().requires_grad_()
    y_hf = module(xm)
    y_hf.backward(dy)
    y, dx, dw = _run(x, w, dy, 1e-5, offset)
    tol = SAME_DTYPE_TOL[dtype] if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, y_hf.detach(), **SAME_DTYPE_TOL[dtype])
    torch.testing.assert_close(dx, xm.grad, **tol)
    torch.testing.assert_close(dw, module.weight.grad, **tol)


def test_triton_fp32_weight_with_half_input(kernel_mode):
    kernel_mode("triton")
    x, w, dy = _inputs((3, 7, 64), torch.float16, w_dtype=torch.float32, seed=7)
    y, dx, dw = _run(x, w, dy, 1e-6, 0.0)
    assert y.dtype == torch.float32 and dx.dtype == torch.float16 and dw.dtype == torch.float32
    torch.testing.assert_close(y, M.rms_norm_reference(x, w), rtol=1e-3, atol=1e-3)
    y64, dx64, dw64 = _fp64_reference(x, w, dy, 1e-6, 0.0)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-2, atol=2e-2)


def test_forward_saves_only_x_weight_and_fp32_rstd(kernel_mode):
    kernel_mode("triton")
    x, w, _ = _inputs((3, 5, 100), torch.float16, seed=8)
    y = rms_norm(x.requires_grad_(), w.requires_grad_())
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 3
    x_rows, weight, rstd = saved
    assert x_rows.data_ptr() == x.data_ptr()  # x itself, no copy
    assert weight.data_ptr() == w.data_ptr()
    assert rstd.dtype == torch.float32 and rstd.shape == (15,)
    expected = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6).reshape(-1)
    torch.testing.assert_close(rstd, expected, rtol=1e-5, atol=1e-6)


def test_frozen_weight_skips_dw(kernel_mode, monkeypatch):
    kernel_mode("triton")
    calls = []
    real = M._n_programs_for_dw
    monkeypatch.setattr(M, "_n_programs_for_dw", lambda *a: calls.append(a) or real(*a))
    x, w, dy = _inputs((4, 6, 72), torch.float16, seed=9)
    xg = x.clone().requires_grad_()
    rms_norm(xg, w).backward(dy)  # w.requires_grad is False (LoRA freezes norms)
    assert calls == [] and w.grad is None
    _, dx64, _ = _fp64_reference(x, w, dy, 1e-6, 0.0, grad_w=False)
    torch.testing.assert_close(xg.grad.double(), dx64, rtol=1e-2, atol=1e-2)
    # and with a trainable weight the dw path runs
    _run(x, w, dy, 1e-6, 0.0)
    assert len(calls) == 1


def test_only_weight_needs_grad(kernel_mode):
    kernel_mode("triton")
    x, w, dy = _inputs((5, 40), torch.float32, seed=10)
    wg = w.clone().requires_grad_()
    rms_norm(x, wg).backward(dy)
    _, _, dw64 = _fp64_reference(x, w, dy, 1e-6, 0.0)
    torch.testing.assert_close(wg.grad.double(), dw64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_chunked_path_for_wide_rows(kernel_mode, monkeypatch, casting):
    """Rows wider than MAX_BLOCK_N take the two-pass chunked kernels (shrunk here to 64)."""
    kernel_mode("triton")
    monkeypatch.setattr(M, "MAX_BLOCK_N", 64)
    assert M._launch_config(200)[1:3] == (64, 4)
    offset = 1.0 if casting == "gemma" else 0.0
    for dtype in (torch.float32, torch.float16):
        x, w, dy = _inputs((7, 200), dtype, offset=offset, seed=11)
        y, dx, dw = _run(x, w, dy, 1e-6, offset, casting)
        y_same, _, _ = _run(x, w, dy, 1e-6, offset, casting, fn=M.rms_norm_reference)
        torch.testing.assert_close(y, y_same, **SAME_DTYPE_TOL[dtype])
        y64, dx64, dw64 = _fp64_reference(x, w, dy, 1e-6, offset)
        torch.testing.assert_close(dx.double(), dx64, **TOL[dtype])
        torch.testing.assert_close(dw.double(), dw64, **TOL[dtype])
    # frozen weight through the chunked kernel too, and x frozen (dw only)
    xg = x.clone().requires_grad_()
    rms_norm(xg, w, 1e-6, offset, casting).backward(dy)
    torch.testing.assert_close(xg.grad.double(), dx64, **TOL[torch.float16])
    wg = w.clone().requires_grad_()
    rms_norm(x, wg, 1e-6, offset, casting).backward(dy)
    torch.testing.assert_close(wg.grad.double(), dw64, **TOL[torch.float16])


@pytest.mark.parametrize("rows,warps,stages", [(2, 8, 1), (4, 16, 2), (3, None, 3)])
def test_dw_backward_with_several_rows_per_iteration(kernel_mode, monkeypatch, rows, warps, stages):
    """The dw backward's launch shape (BWD_DW_ROWS rows per iteration; benchmarks/tune_rms_norm_bwd.py
    sweeps it) gives the same gradients, also where the row count is not a multiple of it, and
    leaves the frozen-weight backward's launch alone."""
    kernel_mode("triton")
    monkeypatch.setattr(M, "TILE_ELEMENTS", 64)  # one row per iteration by default, as at hidden 4096
    monkeypatch.setattr(M, "BWD_DW_ROWS", rows)
    monkeypatch.setattr(M, "BWD_DW_WARPS", warps)
    monkeypatch.setattr(M, "BWD_DW_STAGES", stages)
    assert M._launch_config(100)[0] == 1 and M._bwd_launch_config(100, True)[0] == {3: 4}.get(rows, rows)
    assert M._bwd_launch_config(100, False) == (*M._launch_config(100), 1)
    assert M._bwd_launch_config(100, True)[3] == (warps or M._launch_config(100)[3])
    assert M._bwd_launch_config(100, True)[4] == stages
    for shape in [(11, 100), (2, 9, 576)]:
        x, w, dy = _inputs(shape, torch.float32, seed=13)
        _, dx, dw = _run(x, w, dy, 1e-6, 0.0)
        _, dx64, dw64 = _fp64_reference(x, w, dy, 1e-6, 0.0)
        torch.testing.assert_close(dx.double(), dx64, **TOL[torch.float32])
        torch.testing.assert_close(dw.double(), dw64, **TOL[torch.float32])


def test_non_contiguous_inputs(kernel_mode):
    kernel_mode("triton")
    g = _gen("noncontig")
    wide = torch.randn(3, 5, 130, generator=g)
    x = wide[..., :100]  # row stride 130
    w = 1 + 0.1 * torch.randn(100, generator=g)
    torch.testing.assert_close(rms_norm(x, w), M.rms_norm_reference(x, w), rtol=1e-5, atol=1e-5)
    xt = torch.randn(100, 6, generator=g).t()  # last dim not contiguous
    torch.testing.assert_close(rms_norm(xt, w), M.rms_norm_reference(xt, w), rtol=1e-5, atol=1e-5)
    # a non-contiguous upstream gradient
    xg = x.clone().requires_grad_()
    dy = torch.randn(3, 5, 200, generator=g)[..., ::2]
    rms_norm(xg, w).backward(dy)
    _, dx64, _ = _fp64_reference(x, w, dy, 1e-6, 0.0, grad_w=False)
    torch.testing.assert_close(xg.grad.double(), dx64, rtol=1e-5, atol=1e-5)


def test_empty_input(kernel_mode):
    kernel_mode("triton")
    x = torch.empty(0, 4, 16)
    assert rms_norm(x, torch.ones(16)).shape == (0, 4, 16)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
GPU_TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(2, 2048, 4096), (3, 77, 576), (5, 33, 1000), (2, 64, 3584), (2, 64, 5120),
                                   (1, 64, 8192), (1, 16, 20000), (4096, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_forward_backward(kernel_mode, shape, offset, dtype):
    kernel_mode("auto")
    x, w, dy = _inputs(shape, dtype, offset=offset, seed=12, device="cuda")
    y, dx, dw = _run(x, w, dy, 1e-6, offset)
    assert y.grad_fn is None and dx.is_cuda
    y_same = M.rms_norm_reference(x, w, 1e-6, offset)
    # GPU rounds to nearest like torch: at most ~1 ulp from the reference in the same dtype
    torch.testing.assert_close(y, y_same, rtol=1e-2, atol=1e-2)
    y64, dx64, dw64 = _fp64_reference(x, w, dy, 1e-6, offset)
    torch.testing.assert_close(y.double(), y64, **GPU_TOL[dtype])
    torch.testing.assert_close(dx.double(), dx64, **GPU_TOL[dtype])
    dw_scale = max(1.0, dw64.abs().max().item())
    torch.testing.assert_close(dw.double() / dw_scale, dw64 / dw_scale, **GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_frozen_weight_and_fp32_weight(kernel_mode, dtype):
    kernel_mode("auto")
    x, w, dy = _inputs((2, 2048, 4096), dtype, seed=13, device="cuda")
    xg = x.clone().requires_grad_()
    rms_norm(xg, w).backward(dy)
    assert w.grad is None
    _, dx64, _ = _fp64_reference(x, w, dy, 1e-6, 0.0, grad_w=False)
    torch.testing.assert_close(xg.grad.double(), dx64, **GPU_TOL[dtype])
    w32 = w.float()
    module = LlamaRMSNorm(4096, eps=1e-6).cuda()
    with torch.no_grad():
        module.weight.copy_(w32)
    y = rms_norm(x, w32)
    assert y.dtype == torch.float32
    # x_hat is rounded to the input dtype before the fp32 weight multiplies it: at most 1 ulp apart
    ulp = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(y, module(x), rtol=ulp, atol=ulp)
