"""nbtune.kernels.rope: the Triton kernel (Triton's interpreter on CPU, CUDA on the GPU machine) and
the reference, against transformers' apply_rotary_pos_emb (Llama; Phi-3 for partial rotary)."""
import importlib

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as hf_partial_rope

R = importlib.import_module("nbtune.kernels.rope")
apply_rope = R.apply_rope

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# vs fp64 math on upcast inputs; bf16 is one ulp looser (the interpreter truncates fp32 -> bf16)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _gen(*key):
    return torch.Generator().manual_seed(hash(key) % (2**31))


def _cos_sin(batch, seq, rot, dtype, g, device="cpu", form="rows"):
    """cos/sin as HF builds them (cat(freqs, freqs)), in one of the accepted forms."""
    if form == "table":
        pos = torch.arange(64, dtype=torch.float32)[:, None]
    else:
        pos = torch.randint(0, 64, (batch if form == "rows" else 1, seq), generator=g).float()[..., None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    emb = torch.cat([pos * inv_freq, pos * inv_freq], dim=-1)
    cos, sin = emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)
    if form == "seq":
        cos, sin = cos[0], sin[0]
    return cos, sin


def _qk(batch, n_q, n_k, seq, head_dim, dtype, g, layout="hf", device="cpu", requires_grad=False):
    """q/k as HF makes them: proj(x).view(B, S, H, D).transpose(1, 2); or contiguous (B, H, S, D)."""
    def one(n_heads):
        if layout == "hf":
            base = torch.randn(batch, seq, n_heads * head_dim, generator=g).to(dtype).to(device)
            leaf = base.requires_grad_(requires_grad)
            return leaf, (leaf * 1 if requires_grad else leaf).view(batch, seq, n_heads, head_dim).transpose(1, 2)
        leaf = torch.randn(batch, n_heads, seq, head_dim, generator=g).to(dtype).to(device).requires_grad_(requires_grad)
        return leaf, (leaf * 1 if requires_grad else leaf)

    return one(n_q), one(n_k)


def _fp64(q, k, cos, sin, position_ids, dq, dk):
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    qo, ko = R.apply_rope_reference(q64, k64, cos.double(), sin.double(), position_ids)
    torch.autograd.backward((qo, ko), (dq.double(), dk.double()))
    return qo.detach(), ko.detach(), q64.grad, k64.grad


# ---------------------------------------------------------------------------------------------
# reference == transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_transformers(kernel_mode, dtype):
    kernel_mode("reference")
    g = _gen("ref", str(dtype))
    (_, q), (_, k) = _qk(2, 4, 2, 9, 32, dtype, g)
    cos, sin = _cos_sin(2, 9, 32, dtype, g)
    q_hf, k_hf = hf_llama_rope(q, k, cos, sin)
    q_ref, k_ref = apply_rope(q, k, cos, sin)
    # HF multiplies in the input dtype, the reference in fp32: equal in fp32, ~1 ulp apart otherwise
    torch.testing.assert_close(q_ref, q_hf, **TOL[dtype])
    torch.testing.assert_close(k_ref, k_hf, **TOL[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(q_ref, q_hf, rtol=1e-6, atol=1e-6)
    # partial rotary == Phi-3's apply_rotary_pos_emb
    cos_p, sin_p = _cos_sin(2, 9, 16, dtype, g)
    torch.testing.assert_close(apply_rope(q, k, cos_p, sin_p), hf_partial_rope(q, k, cos_p, sin_p), **TOL[dtype])


def test_reference_gathers_tables_with_position_ids(kernel_mode):
    kernel_mode("reference")
    g = _gen("gather-ref")
    (_, q), (_, k) = _qk(2, 3, 1, 5, 16, torch.float32, g)
    cos_t, sin_t = _cos_sin(0, 0, 16, torch.float32, g, form="table")
    position_ids = torch.randint(0, 64, (2, 5), generator=g)
    q_hf, k_hf = hf_llama_rope(q, k, cos_t[position_ids], sin_t[position_ids])
    q_ref, k_ref = apply_rope(q, k, cos_t, sin_t, position_ids)
    torch.testing.assert_close(q_ref, q_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_ref, k_hf, rtol=1e-6, atol=1e-6)


def test_shape_checks():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos = torch.randn(3, 8)
    with pytest.raises(ValueError, match="even"):
        apply_rope(q, k, cos[:, :5], cos[:, :5])
    with pytest.raises(ValueError, match="differ"):
        apply_rope(q, torch.randn(1, 1, 4, 8), cos, cos)
    with pytest.raises(ValueError, match="fits neither"):
        apply_rope(q, k, torch.randn(4, 8), torch.randn(4, 8))


# ---------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU)
# ---------------------------------------------------------------------------------------------
# (batch, q heads, kv heads, seq, head_dim, rotary dim)
CONFIGS = [(1, 4, 4, 7, 16, 16), (3, 5, 1, 5, 34, 34), (2, 6, 2, 9, 64, 64), (1, 3, 3, 11, 100, 100),
           (2, 4, 2, 5, 32, 16), (2, 3, 1, 4, 24, 10)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["hf", "contiguous"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "b{}q{}k{}s{}d{}r{}".format(*c))
def test_triton_forward_backward(kernel_mode, config, layout, dtype):
    kernel_mode("triton")
    batch, n_q, n_k, seq, head_dim, rot = config
    g = _gen("fb", config, layout, str(dtype))
    (q_leaf, q), (k_leaf, k) = _qk(batch, n_q, n_k, seq, head_dim, dtype, g, layout, requires_grad=True)
    cos, sin = _cos_sin(batch, seq, rot, dtype, g)
    dq, dk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    q64, k64, dq64, dk64 = _fp64(q, k, cos, sin, None, dq, dk)
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out.shape == q.shape and q_out.dtype == dtype and k_out.shape == k.shape
    torch.testing.assert_close(q_out.double(), q64, **TOL[dtype])
    torch.testing.assert_close(k_out.double(), k64, **TOL[dtype])
    torch.autograd.backward((q_out, k_out), (dq, dk))
    dq_got = q_leaf.grad if layout == "contiguous" else q_leaf.grad.view(batch, seq, n_q, head_dim).transpose(1, 2)
    dk_got = k_leaf.grad if layout == "contiguous" else k_leaf.grad.view(batch, seq, n_k, head_dim).transpose(1, 2)
    torch.testing.assert_close(dq_got.double(), dq64, **TOL[dtype])
    torch.testing.assert_close(dk_got.double(), dk64, **TOL[dtype])
    if rot < head_dim:  # pass-through channels: bit for bit, forward and backward
        assert torch.equal(q_out[..., rot:], q64[..., rot:].to(dtype))
        assert torch.equal(dq_got[..., rot:], dq[..., rot:])


@pytest.mark.parametrize("form", ["rows", "batch1", "seq", "table", "table_batch1", "table_int32"])
def test_triton_cos_sin_forms(kernel_mode, form):
    kernel_mode("triton")
    g = _gen("forms", form)
    batch, seq = 3, 6
    (_, q), (_, k) = _qk(batch, 4, 2, seq, 16, torch.float32, g)
    position_ids = None
    if form.startswith("table"):
        cos, sin = _cos_sin(batch, seq, 16, torch.float32, g, form="table")
        position_ids = torch.randint(0, 64, (1 if form == "table_batch1" else batch, seq), generator=g)
        if form == "table_int32":
            position_ids = position_ids.int()
        cos_rows, sin_rows = cos[position_ids.long()], sin[position_ids.long()]
    else:
        cos, sin = _cos_sin(batch, seq, 16, torch.float32, g, form={"batch1": "batch1", "seq": "seq"}.get(form, "rows"))
        cos_rows, sin_rows = (cos, sin) if cos.dim() == 3 else (cos[None], sin[None])
    q_hf, k_hf = hf_llama_rope(q, k, cos_rows, sin_rows)
    q_out, k_out = apply_rope(q.clone(), k.clone(), cos, sin, position_ids)
    torch.testing.assert_close(q_out, q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out, k_hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_transformers_rotary_module(kernel_mode, dtype):
    """cos/sin from LlamaRotaryEmbedding itself, fed to HF's apply_rotary_pos_emb and to ours."""
    kernel_mode("triton")
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    g = _gen("module", str(dtype))
    (_, q), (_, k) = _qk(2, 4, 2, 11, 16, dtype, g)
    position_ids = torch.arange(11)[None].expand(2, 11) + torch.tensor([[0], [5]])
    cos, sin = rotary(q, position_ids)
    q_hf, k_hf = hf_llama_rope(q, k, cos, sin)
    q_out, k_out = apply_rope(q.clone(), k.clone(), cos, sin)
    torch.testing.assert_close(q_out, q_hf, **TOL[dtype])
    torch.testing.assert_close(k_out, k_hf, **TOL[dtype])


def test_in_place_on_hf_views_and_autograd(kernel_mode):
    """HF's transposed q/k views are rotated in place (their projection outputs are overwritten);
    gradients reach the projection weights exactly as through HF's function."""
    kernel_mode("triton")
    g = _gen("inplace")
    batch, seq, n_q, n_k, head_dim = 2, 5, 4, 2, 16
    x = torch.randn(batch, seq, 24, generator=g)
    w_q = torch.randn(n_q * head_dim, 24, generator=g, requires_grad=True)
    w_k = torch.randn(n_k * head_dim, 24, generator=g, requires_grad=True)
    cos, sin = _cos_sin(batch, seq, head_dim, torch.float32, g)

    def attention_like(rope):
        q_proj, k_proj = x @ w_q.T, x @ w_k.T
        q = q_proj.view(batch, seq, n_q, head_dim).transpose(1, 2)
        k = k_proj.view(batch, seq, n_k, head_dim).transpose(1, 2)
        q_out, k_out = rope(q, k, cos, sin)
        loss = (q_out.sin() * 3).sum() + (k_out * k_out).sum()
        loss.backward()
        return q_out.detach().clone(), q_proj, q_out

    q_out, q_proj, q_view_out = attention_like(apply_rope)
    assert q_view_out.data_ptr() == q_proj.data_ptr()  # written into the projection output
    assert q_view_out.stride() == (seq * n_q * head_dim, head_dim, n_q * head_dim, 1)
    grads = w_q.grad.clone(), w_k.grad.clone()
    w_q.grad = w_k.grad = None
    q_hf, _, _ = attention_like(hf_llama_rope)
    torch.testing.assert_close(q_out, q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], w_q.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[1], w_k.grad, rtol=1e-5, atol=1e-4)


def test_in_place_after_per_head_rms_norm(kernel_mode):
    """Qwen3 / Gemma3: q = q_norm(q_proj(x).view(B, S, H, D)).transpose(1, 2); with both kernels on
    the Triton path RoPE still writes in place (into the norm's output) and gradients are right."""
    kernel_mode("triton")
    rms_norm = importlib.import_module("nbtune.kernels.rms_norm").rms_norm
    g = _gen("qknorm")
    batch, seq, n_q, n_k, head_dim = 2, 3, 2, 1, 8
    x = torch.randn(batch, seq, 12, generator=g)
    w_q = torch.randn(n_q * head_dim, 12, generator=g, requires_grad=True)
    w_k = torch.randn(n_k * head_dim, 12, generator=g, requires_grad=True)
    norm_w = 1 + 0.1 * torch.randn(head_dim, generator=g)
    cos, sin = _cos_sin(batch, seq, head_dim, torch.float32, g)

    def run(rope):
        q_normed = rms_norm((x @ w_q.T).view(batch, seq, n_q, head_dim), norm_w)
        k_normed = rms_norm((x @ w_k.T).view(batch, seq, n_k, head_dim), norm_w)
        q_out, k_out = rope(q_normed.transpose(1, 2), k_normed.transpose(1, 2), cos, sin)
        ((q_out * q_out.detach().cos()).sum() + k_out.sum()).backward()
        return q_out, q_normed

    q_out, q_normed = run(apply_rope)
    assert q_out.data_ptr() == q_normed.data_ptr()
    grad = w_q.grad.clone()
    w_q.grad = None
    q_ref, _ = run(R.apply_rope_reference)
    torch.testing.assert_close(q_out, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, w_q.grad, rtol=1e-4, atol=1e-4)


def test_in_place_on_plain_tensors_and_under_no_grad(kernel_mode):
    kernel_mode("triton")
    g = _gen("plain")
    q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 3, 8, generator=g)
    cos, sin = _cos_sin(1, 3, 8, torch.float32, g)
    expected = R.apply_rope_reference(q, k, cos, sin)
    with torch.no_grad():
        q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out is q and k_out is k
    torch.testing.assert_close(q, expected[0], rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        qi, ki = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
        qi_expected = R.apply_rope_reference(qi, ki, cos, sin)[0]
        qi_out, _ = apply_rope(qi, ki, cos, sin)
        assert qi_out.data_ptr() == qi.data_ptr()
        torch.testing.assert_close(qi_out, qi_expected, rtol=1e-6, atol=1e-6)


def test_out_of_place_when_in_place_is_unsafe(kernel_mode):
    """Leaves that need grad, inplace=False, and q/k sharing one fused qkv tensor (split views):
    the inputs stay untouched and the results and gradients are still right."""
    kernel_mode("triton")
    g = _gen("unsafe")
    batch, seq, n_q, n_k, head_dim = 2, 4, 4, 2, 8
    cos, sin = _cos_sin(batch, seq, head_dim, torch.float32, g)
    # leaves that need grad
    q = torch.randn(batch, n_q, seq, head_dim, generator=g, requires_grad=True)
    k = torch.randn(batch, n_k, seq, head_dim, generator=g, requires_grad=True)
    q_before = q.detach().clone()
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out.data_ptr() != q.data_ptr() and torch.equal(q.detach(), q_before)
    torch.testing.assert_close(q_out, R.apply_rope_reference(q, k, cos, sin)[0], rtol=1e-6, atol=1e-6)
    # a view that is itself a leaf needing grad (its base does not need grad)
    base = torch.randn(batch, seq, n_q * head_dim, generator=g)
    q_view = base.view(batch, seq, n_q, head_dim).transpose(1, 2).requires_grad_()
    base_before = base.clone()
    q_view_out, _ = apply_rope(q_view, k, cos, sin)
    q_view_out.sum().backward()
    assert torch.equal(base, base_before) and q_view.grad is not None
    torch.testing.assert_close(q_view.grad, R.apply_rope_reference(torch.ones_like(q_view), k, cos, -sin)[0],
                               rtol=1e-6, atol=1e-6)  # d(sum)/dq = 1*cos - rotate_half(1*sin)
    # inplace=False on tensors that could be written
    q2 = q.detach().clone()
    q2_out, _ = apply_rope(q2, k.detach().clone(), cos, sin, inplace=False)
    assert q2_out.data_ptr() != q2.data_ptr() and torch.equal(q2, q_before)
    # fused qkv (Phi-3 style): split views of one tensor
    w_qkv = torch.randn((n_q + 2 * n_k) * head_dim, 16, generator=g, requires_grad=True)
    x = torch.randn(batch, seq, 16, generator=g)

    def fused(rope):
        qkv = x @ w_qkv.T
        q_s, k_s, _ = qkv.split([n_q * head_dim, n_k * head_dim, n_k * head_dim], dim=-1)
        q_s = q_s.view(batch, seq, n_q, head_dim).transpose(1, 2)
        k_s = k_s.view(batch, seq, n_k, head_dim).transpose(1, 2)
        q_o, k_o = rope(q_s, k_s, cos, sin)
        ((q_o ** 2).sum() + k_o.sum()).backward()
        return q_o.detach()

    q_fused = fused(apply_rope)
    grad = w_qkv.grad.clone()
    w_qkv.grad = None
    torch.testing.assert_close(q_fused, fused(R.apply_rope_reference), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, w_qkv.grad, rtol=1e-5, atol=1e-4)


def test_cos_sin_needing_grad_take_the_reference(kernel_mode):
    kernel_mode("triton")
    g = _gen("cosgrad")
    q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 3, 8, generator=g)
    cos, sin = _cos_sin(1, 3, 8, torch.float32, g)
    cos.requires_grad_()
    q_out, k_out = apply_rope(q, k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    assert cos.grad is not None and cos.grad.shape == cos.shape


def test_backward_is_the_transpose(kernel_mode):
    """<R x, y> == <x, R^T y> for the kernel's forward and backward, with cos/sin halves that differ
    (not HF's cat(freqs, freqs)), so the (-s2, -s1) swap of the backward is checked for real."""
    kernel_mode("triton")
    g = _gen("adjoint")
    q = torch.randn(2, 3, 5, 12, generator=g, dtype=torch.float64).float()
    k = torch.randn(2, 1, 5, 12, generator=g).float()
    cos, sin = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    dq, dk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_out, k_out = apply_rope(qg, kg, cos, sin)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    lhs = (q_out * dq).sum() + (k_out * dk).sum()
    rhs = (q * qg.grad).sum() + (k * kg.grad).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-4)
    _, _, dq64, dk64 = _fp64(q, k, cos, sin, None, dq, dk)
    torch.testing.assert_close(qg.grad.double(), dq64, rtol=1e-5, atol=1e-5)


def test_auto_mode_on_cpu_runs_the_reference(kernel_mode):
    kernel_mode("auto")
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    q_before = q.clone()
    q_out, _ = apply_rope(q, k, cos, sin)
    assert torch.equal(q, q_before) and q_out.data_ptr() != q.data_ptr()


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
GPU_TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [(2, 32, 8, 2048, 128, 128), (2, 9, 3, 333, 64, 64), (1, 32, 32, 100, 96, 48),
                                    (4, 28, 4, 64, 128, 128)], ids=lambda c: "b{}q{}k{}s{}d{}r{}".format(*c))
@pytest.mark.parametrize("layout", ["hf", "contiguous"])
def test_gpu_forward_backward(kernel_mode, config, layout, dtype):
    kernel_mode("auto")
    batch, n_q, n_k, seq, head_dim, rot = config
    g = _gen("gpu", config, layout, str(dtype))
    (q_leaf, q), (k_leaf, k) = _qk(batch, n_q, n_k, seq, head_dim, dtype, g, layout, "cuda", requires_grad=True)
    cos, sin = _cos_sin(batch, seq, rot, dtype, g, "cuda")
    dq = torch.randn(q.shape, generator=g).to(dtype).cuda()
    dk = torch.randn(k.shape, generator=g).to(dtype).cuda()
    q64, k64, dq64, dk64 = _fp64(q, k, cos, sin, None, dq, dk)
    q_hf = hf_llama_rope(q.detach(), k.detach(), cos, sin)[0] if rot == head_dim else q64  # before q is overwritten
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out.data_ptr() == q.data_ptr()  # in place (into the projection output for the HF layout)
    torch.testing.assert_close(q_out.double(), q64, **GPU_TOL[dtype])
    torch.testing.assert_close(k_out.double(), k64, **GPU_TOL[dtype])
    torch.testing.assert_close(q_out.double(), q_hf.double(), **GPU_TOL[dtype])
    torch.autograd.backward((q_out, k_out), (dq, dk))
    dq_got = q_leaf.grad if layout == "contiguous" else q_leaf.grad.view(batch, seq, n_q, head_dim).transpose(1, 2)
    dk_got = k_leaf.grad if layout == "contiguous" else k_leaf.grad.view(batch, seq, n_k, head_dim).transpose(1, 2)
    torch.testing.assert_close(dq_got.double(), dq64, **GPU_TOL[dtype])
    torch.testing.assert_close(dk_got.double(), dk64, **GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_position_ids_tables(kernel_mode, dtype):
    kernel_mode("auto")
    g = _gen("gpu-table", str(dtype))
    (_, q), (_, k) = _qk(2, 32, 8, 512, 128, dtype, g, "hf", "cuda")
    cos, sin = _cos_sin(0, 0, 128, torch.float32, g, "cuda", form="table")
    position_ids = torch.randint(0, 64, (2, 512), generator=g).cuda()
    q_hf, k_hf = hf_llama_rope(q.float(), k.float(), cos[position_ids], sin[position_ids])
    q_out, k_out = apply_rope(q.clone(), k.clone(), cos, sin, position_ids)
    torch.testing.assert_close(q_out.float(), q_hf, **GPU_TOL[dtype])
    torch.testing.assert_close(k_out.float(), k_hf, **GPU_TOL[dtype])
