"""nbtune.kernels.varlen_attention: the Triton kernels (Triton's interpreter on CPU, CUDA on the GPU
machine) and the reference, against fp64 packed attention with an explicit (T x T) mask."""
import importlib
import math

import pytest
import torch

M = importlib.import_module("nbtune.kernels.varlen_attention")
varlen_attention = M.varlen_attention

# Triton (fp32 math, inputs rounded to the dtype) vs the fp64 truth on the same rounded inputs
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _inputs(lengths, heads, kv_heads, dim, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v, do = (torch.randn(n, h, dim, generator=g) for h in (heads, kv_heads, kv_heads, heads))
    return *(t.to(dtype).to(device) for t in (q, k, v, do)), _cu(lengths, device)


def explicit(q, k, v, cu, scale, window=None, softcap=None):
    """fp64 attention over the whole packed row with one (T x T) mask: same document, causal,
    within the window. Independent of the per-document reference."""
    groups = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.double().transpose(0, 1) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(groups, 0), vd.repeat_interleave(groups, 0)
    z = qd @ kd.transpose(-1, -2) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lengths = (cu[1:] - cu[:-1]).long().cpu()
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(q.device)
    i = torch.arange(q.shape[0], device=q.device)
    ok = (i[None, :] <= i[:, None]) & (doc[None, :] == doc[:, None])
    if window is not None:
        ok = ok & (i[:, None] - i[None, :] < window)
    return (z.masked_fill(~ok, float("-inf")).softmax(-1) @ vd).transpose(0, 1)


def _run(fn, q, k, v, cu, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, cu, **kw)
    out.backward(do.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _truth(q, k, v, cu, do, scale, window=None, softcap=None):
    return _run(lambda a, b, c, cu: explicit(a, b, c, cu, scale, window, softcap), q, k, v, cu, do.double())


def _assert_close(got, want, dtype, what=("out", "dq", "dk", "dv")):
    for name, a, b in zip(what, got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double() / scale, b.double() / scale, **TOL[dtype], msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 1.5), (6, 2.0)])
def test_reference_is_the_explicit_masked_attention(kernel_mode, window, softcap):
    kernel_mode("reference")
    q, k, v, do, cu = _inputs([3, 1, 12, 9], 4, 2, 8, torch.float64, seed=1)
    got = _run(varlen_attention, q, k, v, cu, do, scale=0.4, window=window, softcap=softcap)
    want = _truth(q, k, v, cu, do, 0.4, window, softcap)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_auto_mode_on_cpu_runs_the_reference(kernel_mode):
    kernel_mode("auto")
    q, k, v, _, cu = _inputs([5, 4], 2, 1, 8, torch.float32)
    q.requires_grad_()
    out = varlen_attention(q, k, v, cu)
    assert "VarlenAttention" not in type(out.grad_fn).__name__  # plain torch ops, no Triton Function
    assert torch.equal(out, M.varlen_attention_reference(q, k, v, cu, scale=1 / math.sqrt(8)))


def test_bad_inputs_are_named(kernel_mode):
    kernel_mode("reference")
    q, k, v, _, cu = _inputs([5, 4], 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="query heads"):
        varlen_attention(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu)
    with pytest.raises(ValueError, match="tokens, heads, head_dim"):
        varlen_attention(q[None], k, v, cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, cu.float())
    with pytest.raises(ValueError, match="window"):
        varlen_attention(q, k, v, cu, window=0)
    with pytest.raises(ValueError, match="rise from 0"):
        varlen_attention(q, k, v, _cu([5, 3]))
    with pytest.raises(ValueError, match="rise from 0"):
        varlen_attention(q, k, v, torch.tensor([0, 6, 5, 9], dtype=torch.int32))


def test_document_bounds():
    start, end = M.document_bounds(_cu([2, 1, 3]), 6)
    assert start.tolist() == [0, 0, 2, 3, 3, 3] and end.tolist() == [2, 2, 3, 6, 6, 6]
    assert start.dtype == end.dtype == torch.int32


# ---------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU; tiles of 16/32 tokens, so these lengths cross tiles and
# documents inside tiles)
# ---------------------------------------------------------------------------------------------
LENGTHS = [1, 7, 33, 64]
CASES = {
    "gqa4:2": dict(heads=4, kv_heads=2, dim=16),
    "gqa4:1-d32": dict(heads=4, kv_heads=1, dim=32),
    "window": dict(heads=4, kv_heads=2, dim=16, window=5),
    "softcap": dict(heads=4, kv_heads=2, dim=16, softcap=1.5),
    "window+softcap-mha": dict(heads=2, kv_heads=2, dim=16, window=9, softcap=2.0),
    "head_dim-24": dict(heads=2, kv_heads=1, dim=24),  # not a power of 2 (masked channels)
    "head_dim-8": dict(heads=2, kv_heads=2, dim=8),    # padded to the 16 channels tl.dot needs
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_fp32_matches_fp64_truth(kernel_mode, case):
    kernel_mode("triton")
    c = dict(CASES[case])
    window, softcap = c.pop("window", None), c.pop("softcap", None)
    q, k, v, do, cu = _inputs(LENGTHS, c["heads"], c["kv_heads"], c["dim"], torch.float32, seed=2)
    got = _run(varlen_attention, q, k, v, cu, do, scale=0.3, window=window, softcap=softcap)
    assert got[0].grad_fn is None and got[0].shape == q.shape and got[2].shape == k.shape
    _assert_close(got, _truth(q, k, v, cu, do, 0.3, window, softcap), torch.float32)
    # and the per-document reference in the same dtype
    ref = _run(M.varlen_attention_reference, q, k, v, cu, do, scale=0.3, window=window, softcap=softcap)
    _assert_close(got, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["gqa4:2", "window+softcap-mha"])
def test_triton_half_precision(kernel_mode, case, dtype):
    kernel_mode("triton")
    c = dict(CASES[case])
    window, softcap = c.pop("window", None), c.pop("softcap", None)
    q, k, v, do, cu = _inputs(LENGTHS, c["heads"], c["kv_heads"], c["dim"], dtype, seed=3)
    got = _run(varlen_attention, q, k, v, cu, do, window=window, softcap=softcap)
    assert all(t.dtype == dtype for t in got)
    _assert_close(got, _truth(q, k, v, cu, do, 1 / math.sqrt(c["dim"]), window, softcap), dtype)


def test_triton_documents_of_one_token_and_empty_documents(kernel_mode):
    """A pad tail of one-token documents (each sees only itself: its own value) and zero-length
    documents in cu_seqlens (repeated boundaries) change nothing."""
    kernel_mode("triton")
    lengths = [9, 1, 1, 1, 1, 20, 1]
    q, k, v, do, cu = _inputs(lengths, 2, 1, 16, torch.float32, seed=4)
    got = _run(varlen_attention, q, k, v, cu, do, scale=0.5)
    _assert_close(got, _truth(q, k, v, cu, do, 0.5), torch.float32)
    torch.testing.assert_close(got[0][9:13], v[9:13].expand(-1, 2, -1))
    with_empty = torch.tensor([0, 0, 9, 9, 10, 11, 12, 13, 33, 34, 34], dtype=torch.int32)
    again = _run(varlen_attention, q, k, v, with_empty, do, scale=0.5)
    for a, b in zip(got, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_triton_window_longer_than_documents_is_causal(kernel_mode):
    kernel_mode("triton")
    q, k, v, do, cu = _inputs([12, 30], 2, 2, 16, torch.float32, seed=5)
    windowed = _run(varlen_attention, q, k, v, cu, do, window=64)
    plain = _run(varlen_attention, q, k, v, cu, do)
    for a, b in zip(windowed, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_triton_non_contiguous_inputs_and_frozen_kv(kernel_mode):
    """q/k/v as the patched attention hands them: (B, S, H, D) storage seen through a transpose,
    rows of a batch concatenated; k and v frozen (only dq is computed)."""
    kernel_mode("triton")
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(40, 2 + 1 + 1, 16, generator=g)  # one fused projection: [q heads | k | v]
    q, k, v = qkv[:, :2], qkv[:, 2:3], qkv[:, 3:]
    assert not q.is_contiguous()
    cu = _cu([17, 23])
    do = torch.randn(40, 2, 16, generator=g)
    qg = q.clone().requires_grad_()
    out = varlen_attention(qg, k, v, cu, scale=0.25)
    out.backward(do)
    want = _truth(q, k, v, cu, do, 0.25)
    _assert_close((out.detach(), qg.grad), want[:2], torch.float32, what=("out", "dq"))


def test_triton_saves_only_inputs_output_and_fp32_lse(kernel_mode):
    kernel_mode("triton")
    q, k, v, _, cu = _inputs([10, 6], 4, 2, 16, torch.float16)
    q.requires_grad_()
    out = varlen_attention(q, k, v, cu)
    saved = out.grad_fn.saved_tensors
    assert saved[0].data_ptr() == q.data_ptr() and saved[3].data_ptr() == out.data_ptr()
    lse = saved[4]
    assert lse.dtype == torch.float32 and lse.shape == (4, 16)
    # base-2 log-sum-exp of the scaled scores of each query's visible keys
    truth = []
    for h in range(4):
        z = (q[:, h].double() @ k[:, h // 2].double().T) / math.sqrt(16)
        doc = torch.tensor([0] * 10 + [1] * 6)
        i = torch.arange(16)
        ok = (i[None] <= i[:, None]) & (doc[None] == doc[:, None])
        truth.append(torch.logsumexp(z.masked_fill(~ok, float("-inf")), -1) / math.log(2))
    torch.testing.assert_close(lse.double(), torch.stack(truth), rtol=1e-3, atol=1e-3)


def test_triton_tiles_of_other_shapes(kernel_mode, monkeypatch):
    """The same answer with equal tiles and with tiles larger than every document."""
    kernel_mode("triton")
    q, k, v, do, cu = _inputs([3, 21, 8], 2, 1, 16, torch.float32, seed=7)
    want = _truth(q, k, v, cu, do, 0.3, window=4, softcap=3.0)
    for tiles in ({"fwd": (16, 16, 1, 1), "dkdv": (16, 16, 1, 1), "dq": (16, 16, 1, 1)},
                  {"fwd": (64, 32, 1, 1), "dkdv": (64, 64, 1, 1), "dq": (32, 64, 1, 1)}):
        monkeypatch.setattr(M, "INTERPRET_CONFIG", tiles)
        got = _run(varlen_attention, q, k, v, cu, do, scale=0.3, window=4, softcap=3.0)
        _assert_close(got, want, torch.float32)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
def _gpu_lengths(total=4096, n_docs=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(total - 1, generator=g)[:n_docs - 1].add(1).tolist())
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


GPU_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("dim,heads,kv_heads", [(64, 9, 3), (128, 32, 8), (256, 8, 4), (96, 32, 32)])
@pytest.mark.parametrize("window,softcap", [(None, None), (512, None), (4096, 50.0)])
def test_gpu_matches_reference(kernel_mode, dim, heads, kv_heads, window, softcap, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    if dim == 256 and heads == 8 and softcap is None and window is None:
        softcap = 30.0  # Gemma 2's attention softcap, at its head_dim
    kernel_mode("auto")
    lengths = _gpu_lengths()
    q, k, v, do, cu = _inputs(lengths, heads, kv_heads, dim, dtype, seed=8, device="cuda")
    got = _run(varlen_attention, q, k, v, cu, do, window=window, softcap=softcap)
    assert got[0].grad_fn is None
    ref = _run(M.varlen_attention_reference, q.float(), k.float(), v.float(), cu, do.float(),
               scale=1 / math.sqrt(dim), window=window, softcap=softcap)
    _assert_close(got, ref, dtype)


@pytest.mark.gpu
def test_gpu_fp32_and_deterministic(kernel_mode):
    kernel_mode("auto")
    q, k, v, do, cu = _inputs(_gpu_lengths(1024, 7), 8, 2, 128, torch.float32, seed=9, device="cuda")
    got = _run(varlen_attention, q, k, v, cu, do, window=100, softcap=20.0)
    ref = _run(M.varlen_attention_reference, q, k, v, cu, do, scale=1 / math.sqrt(128), window=100, softcap=20.0)
    _assert_close(got, ref, torch.float32)
    again = _run(varlen_attention, q, k, v, cu, do, window=100, softcap=20.0)
    for a, b in zip(got, again):
        assert torch.equal(a, b)  # no atomics: bit for bit
