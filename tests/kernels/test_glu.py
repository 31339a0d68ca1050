"""nbtune.kernels.glu: SwiGLU / GeGLU forward and backward vs transformers' activations.

CPU: the reference path and the Triton kernels under Triton's interpreter (small shapes).
GPU (marker gpu): the Triton path on CUDA at llama3-8b sizes.
"""
import zlib

import pytest
import torch
from transformers.activations import ACT2FN

from nbtune.kernels import glu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 7, 33), (3, 5, 100), (2, 3000)]
# name in nbtune -> (public call, transformers' ACT2FN key)
ACTS = {
    "swiglu": (lambda g, u: glu.swiglu(g, u), "silu"),
    "geglu": (lambda g, u: glu.geglu(g, u), "gelu"),
    "geglu_tanh": (lambda g, u: glu.geglu(g, u, approximate="tanh"), "gelu_pytorch_tanh"),
}


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


def assert_close(actual, expected, rel):
    """Elementwise |a - e| <= rel * (|e| + max|e| * 1e-1): relative, with a small floor near zero."""
    expected = expected.to(torch.float64)
    floor = expected.abs().max().item() * 0.1 + 1e-12
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rel, atol=rel * floor)


def transformers_glu(act_key, gate, up):
    """The HF MLP's act_fn(gate) * up, in fp64 on upcast inputs."""
    return ACT2FN[act_key](gate.double()) * up.double()


def run_fwd_bwd(fn, gate, up, dh):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    h = fn(gate, up)
    dgate, dup = torch.autograd.grad(h, (gate, up), dh)
    return h, dgate, dup


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_glu_matches_transformers(act, dtype, shape, mode, kernel_mode):
    kernel_mode(mode)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{act}{dtype}{shape}{mode}".encode()))
    gate = (torch.randn(shape, generator=gen) * 2).to(dtype)
    up = torch.randn(shape, generator=gen).to(dtype)
    dh = torch.randn(shape, generator=gen).to(dtype)
    fn, act_key = ACTS[act]

    h, dgate, dup = run_fwd_bwd(fn, gate, up, dh)
    h_ref, dgate_ref, dup_ref = run_fwd_bwd(lambda g, u: transformers_glu(act_key, g, u), gate.double(), up.double(), dh.double())

    assert h.dtype == dgate.dtype == dup.dtype == dtype
    assert h.shape == dgate.shape == dup.shape == shape
    assert_close(h, h_ref, tol(dtype))
    assert_close(dgate, dgate_ref, tol(dtype))
    assert_close(dup, dup_ref, tol(dtype))


@pytest.mark.parametrize("act", list(ACTS))
def test_glu_non_contiguous_halves_of_a_fused_projection(act, kernel_mode):
    """gate/up as the two halves of one fused (tokens, 2 * I) projection (Phi-3 style): strided rows."""
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(11)
    fused = torch.randn(2, 9, 2 * 45, generator=gen)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    dh = torch.randn(2, 9, 45, generator=gen)
    fn, act_key = ACTS[act]
    h, dgate, dup = run_fwd_bwd(fn, gate, up, dh)
    h_ref, dgate_ref, dup_ref = run_fwd_bwd(lambda g, u: transformers_glu(act_key, g, u), gate.double(), up.double(), dh.double())
    assert_close(h, h_ref, 1e-5)
    assert_close(dgate, dgate_ref, 1e-5)
    assert_close(dup, dup_ref, 1e-5)


def test_glu_only_gate_requires_grad(kernel_mode):
    kernel_mode("triton")
    gate = torch.randn(4, 40, requires_grad=True)
    up = torch.randn(4, 40)
    glu.swiglu(gate, up).sum().backward()
    expected = (torch.sigmoid(gate) * (1 + gate * (1 - torch.sigmoid(gate))) * up).detach()
    assert up.grad is None
    assert_close(gate.grad, expected, 1e-5)


@pytest.mark.parametrize("act", list(glu.ACTIVATIONS))
@pytest.mark.parametrize("store_h", [True, False])
def test_backward_inplace_helper_overwrites_buffers(act, store_h, kernel_mode):
    """The LoRA MLP's helper: dgate over gate, dup over up, h (recomputed) over dh."""
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(5)
    gate, up, dh = (torch.randn(6, 70, generator=gen, dtype=torch.float16) for _ in range(3))
    activation = glu.ACTIVATIONS[act]
    _, act_key = ACTS[act]
    h_ref, dgate_ref, dup_ref = run_fwd_bwd(lambda g, u: transformers_glu(act_key, g, u), gate.double(), up.double(), dh.double())
    buffers = (gate.data_ptr(), up.data_ptr(), dh.data_ptr())
    dh_before = dh.clone()

    dgate, dup, h = glu.glu_backward_inplace(dh, gate, up, activation, store_h=store_h)

    assert (dgate.data_ptr(), dup.data_ptr()) == buffers[:2]
    assert_close(gate, dgate_ref, 1e-2)
    assert_close(up, dup_ref, 1e-2)
    if store_h:
        assert h.data_ptr() == buffers[2]
        assert_close(dh, h_ref, 1e-2)
    else:
        assert h is None
        assert torch.equal(dh, dh_before)


@pytest.mark.parametrize("act", list(glu.ACTIVATIONS))
def test_forward_helper_writes_into_given_buffer(act, kernel_mode):
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(6)
    gate, up = (torch.randn(5, 33, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    out = torch.full((5, 33), float("nan"), dtype=torch.bfloat16)
    h = glu.glu_forward_2d(gate, up, glu.ACTIVATIONS[act], out=out)
    assert h.data_ptr() == out.data_ptr()
    assert_close(out, transformers_glu(ACTS[act][1], gate, up), 1e-2)


@pytest.mark.parametrize("shape", [(37, 33), (3, 4200)], ids=str)
def test_gpu_tiling_under_the_interpreter(shape, kernel_mode, monkeypatch):
    """The GPU launch configuration (2048-element tiles: several narrow rows, or 2048-wide slices
    of a wide row with a masked tail), run in the interpreter."""
    kernel_mode("triton")
    monkeypatch.setattr(glu, "interpreting", lambda: False)
    grid, block_rows, block_cols, _ = glu._launch_config(*shape)
    assert block_rows * block_cols <= 2048 and grid[0] * block_rows >= shape[0] and grid[1] * block_cols >= shape[1]
    gen = torch.Generator().manual_seed(7)
    gate, up, dh = (torch.randn(shape, generator=gen) for _ in range(3))
    h, dgate, dup = run_fwd_bwd(glu.swiglu, gate, up, dh)
    h_ref, dgate_ref, dup_ref = run_fwd_bwd(lambda g, u: transformers_glu("silu", g, u), gate.double(), up.double(), dh.double())
    assert_close(h, h_ref, 1e-5)
    assert_close(dgate, dgate_ref, 1e-5)
    assert_close(dup, dup_ref, 1e-5)


def test_empty_input(kernel_mode):
    kernel_mode("triton")
    gate = torch.randn(0, 16, requires_grad=True)
    up = torch.randn(0, 16, requires_grad=True)
    h = glu.swiglu(gate, up)
    h.sum().backward()
    assert h.shape == (0, 16) and gate.grad.shape == (0, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="approximate"):
        glu.geglu(torch.randn(2, 4), torch.randn(2, 4), approximate="erf")
    with pytest.raises(ValueError, match="same shape"):
        glu._GLUFunction.apply(torch.randn(2, 4), torch.randn(2, 5), glu.SILU)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2048, 14336), (1, 1000, 11008), (4096, 8193)], ids=str)
def test_glu_gpu(act, dtype, shape):
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate = (torch.randn(shape, generator=gen, device="cuda") * 2).to(dtype)
    up = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    dh = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    fn, act_key = ACTS[act]
    h, dgate, dup = run_fwd_bwd(fn, gate, up, dh)
    h_ref, dgate_ref, dup_ref = run_fwd_bwd(
        lambda g, u: ACT2FN[act_key](g.float()) * u.float(), gate.float(), up.float(), dh.float()
    )
    assert_close(h, h_ref, 1e-2)
    assert_close(dgate, dgate_ref, 1e-2)
    assert_close(dup, dup_ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("act", list(glu.ACTIVATIONS))
def test_backward_inplace_gpu_llama_size(act):
    gen = torch.Generator(device="cuda").manual_seed(1)
    gate, up, dh = (torch.randn(4096, 14336, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    _, act_key = ACTS[act]
    g32, u32, dh32 = gate.float(), up.float(), dh.float()
    a32 = ACT2FN[act_key](g32.requires_grad_())
    (da,) = torch.autograd.grad(a32, g32, dh32 * u32)
    dup_ref, h_ref = dh32 * a32.detach(), a32.detach() * u32
    glu.glu_backward_inplace(dh, gate, up, glu.ACTIVATIONS[act], store_h=True)
    assert_close(gate, da, 1e-2)
    assert_close(up, dup_ref, 1e-2)
    assert_close(dh, h_ref, 1e-2)
