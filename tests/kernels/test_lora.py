"""nbtune.kernels.lora: LoRA linear / QKV / MLP over 4-bit and 16-bit bases.

Compared with the plain-torch reference (fp32 on upcast inputs) and with real peft LoRA layers over
torch.nn.Linear and bitsandbytes Linear4bit (tiny modules, and transformers' LlamaMLP / GemmaMLP):
outputs, dX and the LoRA grads. CPU runs the fused autograd Functions with the GLU (and NF4) Triton
kernels in Triton's interpreter; GPU tests (marker gpu) run at llama3-8b sizes.
"""
import os
import zlib

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from transformers import GemmaConfig, LlamaConfig  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaMLP  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

from nbtune.kernels import lora  # noqa: E402
from nbtune.kernels.lora import LoRAProjection  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACT_TO_HF = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh"}


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def tol(dtype):
    """fp32: 1e-5. fp16: 1e-2. bf16 (8-bit mantissa): 2e-2, since the MLP rounds g, u, h and the
    base and LoRA partial sums to bf16 in series (as transformers + peft do too), which measures
    up to ~1.5e-2 normwise against the fp32 reference at these tiny sizes."""
    return {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]


def assert_close(actual, expected, rel, what=""):
    """Normwise: max |a - e| <= rel * max |e| (cuBLAS/CPU GEMMs sum in different orders and 16-bit
    paths round intermediates, so elementwise relative error near zero means nothing)."""
    assert actual.shape == expected.shape, what
    a, e = actual.detach().double(), expected.detach().double()
    err, scale = (a - e).abs().max().item(), e.abs().max().item()
    assert torch.isfinite(a).all(), what
    assert err <= rel * scale + 1e-30, f"{what}: max err {err:.3g} > {rel:g} * max {scale:.3g}"


# ----------------------------------------------------------------------------- building blocks
def make_base(kind, n_out, n_in, dtype, bias, gen, device="cpu"):
    """A frozen base layer: nn.Linear in dtype, or bitsandbytes Linear4bit (NF4, double quant)."""
    w = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    b = torch.randn(n_out, generator=gen) * 0.1 if bias else None
    if kind == "dense":
        layer = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if bias:
                layer.bias.copy_(b)
    else:
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=dtype, quant_type="nf4",
                                  compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        if bias:
            layer.bias = nn.Parameter(b.to(dtype), requires_grad=False)
    layer.requires_grad_(False)
    return layer.to(device)  # Params4bit quantizes on its first move to a device


def make_projection(kind, n_out, n_in, dtype, bias, gen, r=8, adapter_dtype=None, device="cpu"):
    base = make_base(kind, n_out, n_in, dtype, bias, gen, device)
    adapter_dtype = adapter_dtype or dtype
    A = (torch.randn(r, n_in, generator=gen) / n_in**0.5).to(device, adapter_dtype).requires_grad_()
    B = (torch.randn(n_out, r, generator=gen) * 0.2).to(device, adapter_dtype).requires_grad_()
    return LoRAProjection(base, A, B, 2.0, base.bias)


def upcast(p: LoRAProjection) -> LoRAProjection:
    """Same base; fp64 leaf copies of A and B (the reference computes in fp32 from them)."""
    return p._replace(
        lora_A=p.lora_A.detach().double().requires_grad_(p.lora_A.requires_grad),
        lora_B=p.lora_B.detach().double().requires_grad_(p.lora_B.requires_grad),
    )


def leaves(projections):
    return [t for p in projections for t in (p.lora_A, p.lora_B)]


def fwd_bwd(fn, x, params, grads_out, mode=None):
    """Outputs and the grads of x and params (None where a tensor does not require grad); the
    forward runs under NBTUNE_KERNELS=mode when given."""
    saved_mode = os.environ.get("NBTUNE_KERNELS")
    if mode is not None:
        os.environ["NBTUNE_KERNELS"] = mode
    try:
        outs = fn(x)
    finally:
        if saved_mode is None:
            os.environ.pop("NBTUNE_KERNELS", None)
        else:
            os.environ["NBTUNE_KERNELS"] = saved_mode
    outs = outs if isinstance(outs, tuple) else (outs,)
    wrt = [t for t in [x, *params] if t.requires_grad]
    got = iter(torch.autograd.grad(outs, wrt, [g.to(o.device, o.dtype) for g, o in zip(grads_out, outs)]))
    return outs, [next(got) if t.requires_grad else None for t in [x, *params]]


def random_grads_for(fn, x, dtype, gen):
    """One random output gradient per output of fn(x), in dtype (shapes from a no-grad reference run)."""
    saved_mode = os.environ.get("NBTUNE_KERNELS")
    os.environ["NBTUNE_KERNELS"] = "reference"
    try:
        with torch.no_grad():
            outs = fn(x)
    finally:
        if saved_mode is None:
            os.environ.pop("NBTUNE_KERNELS", None)
        else:
            os.environ["NBTUNE_KERNELS"] = saved_mode
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [torch.randn(o.shape, generator=gen).to(o.device, dtype) for o in outs]


def compare(fused, fused_x, fused_params, ref, ref_x, ref_params, gen, rel):
    grads_out = random_grads_for(ref, ref_x, fused_x.dtype, gen)
    outs, grads = fwd_bwd(fused, fused_x, fused_params, grads_out)
    # the reference side (plain torch, or peft) dequantizes with nf4's own reference, not through
    # Triton's interpreter: same values, less CPU time
    ref_outs, ref_grads = fwd_bwd(ref, ref_x, ref_params, grads_out, mode="reference")
    for i, (o, ro) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == fused_x.dtype
        assert_close(o, ro, rel, f"output {i}")
    for i, (g, rg, p) in enumerate(zip(grads, ref_grads, [fused_x, *fused_params])):
        assert (g is None) == (rg is None) == (not p.requires_grad), f"grad {i}"
        if g is not None:
            assert g.dtype == p.dtype, f"grad {i} dtype"
            assert_close(g, rg, rel, f"grad {i}")
    return outs, grads


# configurations: (base kind, dtype, adapter dtype); fp32 adapters next to a 16-bit base is what
# peft's get_peft_model(autocast_adapter_dtype=True) makes
CONFIGS = [
    (kind, dtype, adapter)
    for kind in ("4bit", "dense")
    for dtype in DTYPES
    for adapter in ([dtype] if dtype == torch.float32 else [dtype, torch.float32])
]
CONFIG_IDS = [f"{k}-{str(d)[6:]}-A{str(a)[6:]}" for k, d, a in CONFIGS]
# swiglu on every configuration, the two GeGLUs on three 4-bit ones (keeps CPU time low)
MLP_CASES = [(c, "swiglu") for c in CONFIGS] + [
    (c, act) for act in ("geglu", "geglu_tanh")
    for c in [("4bit", torch.float32, torch.float32), ("4bit", torch.float16, torch.float16),
              ("4bit", torch.bfloat16, torch.float32)]
]
MLP_IDS = [f"{act}-{i}" for (c, act), i in zip(MLP_CASES, [CONFIG_IDS[CONFIGS.index(c)] for c, _ in MLP_CASES])]


# ----------------------------------------------------------------------------- vs the reference
@pytest.mark.parametrize("kind,dtype,adapter_dtype", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("bias,shape", [(False, ((1, 7), 33, 20)), (True, ((3, 5), 100, 17))], ids=str)
def test_lora_linear_matches_reference(kind, dtype, adapter_dtype, bias, shape, kernel_mode):
    kernel_mode("triton")
    lead, n_in, n_out = shape
    gen = torch.Generator().manual_seed(seed_of("linear", kind, dtype, adapter_dtype, bias, shape))
    p = make_projection(kind, n_out, n_in, dtype, bias, gen, adapter_dtype=adapter_dtype)
    x = torch.randn(*lead, n_in, generator=gen).to(dtype).requires_grad_()
    rp = upcast(p)
    compare(
        lambda t: lora.lora_linear(t, *p), x, leaves([p]),
        lambda t: lora.lora_linear_reference(t, *rp), x.detach().double().requires_grad_(), leaves([rp]),
        gen, tol(dtype),
    )


@pytest.mark.parametrize("config,activation", MLP_CASES, ids=MLP_IDS)
def test_lora_mlp_matches_reference(config, activation, kernel_mode):
    kernel_mode("triton")
    kind, dtype, adapter_dtype = config
    gen = torch.Generator().manual_seed(seed_of("mlp", kind, dtype, adapter_dtype, activation))
    hidden, inter = 36, 70
    bias = activation == "geglu"  # biases on one activation's runs, to keep the matrix small
    gate, up = (make_projection(kind, inter, hidden, dtype, bias, gen, adapter_dtype=adapter_dtype) for _ in range(2))
    down = make_projection(kind, hidden, inter, dtype, bias, gen, r=4, adapter_dtype=adapter_dtype)
    x = torch.randn(2, 9, hidden, generator=gen).to(dtype).requires_grad_()
    ref = [upcast(p) for p in (gate, up, down)]
    compare(
        lambda t: lora.lora_mlp(t, gate, up, down, activation), x, leaves([gate, up, down]),
        lambda t: lora.lora_mlp_reference(t, *ref, activation), x.detach().double().requires_grad_(), leaves(ref),
        gen, tol(dtype),
    )


@pytest.mark.parametrize("kind", ["4bit", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_qkv_matches_reference(kind, dtype, kernel_mode):
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(seed_of("qkv", kind, dtype))
    q = make_projection(kind, 48, 40, dtype, True, gen)
    k, v = (make_projection(kind, 16, 40, dtype, False, gen) for _ in range(2))
    x = torch.randn(3, 5, 40, generator=gen).to(dtype).requires_grad_()
    ref = [upcast(p) for p in (q, k, v)]
    outs, _ = compare(
        lambda t: lora.lora_qkv(t, q, k, v), x, leaves([q, k, v]),
        lambda t: lora.lora_qkv_reference(t, *ref), x.detach().double().requires_grad_(), leaves(ref),
        gen, tol(dtype),
    )
    assert [o.shape for o in outs] == [(3, 5, 48), (3, 5, 16), (3, 5, 16)]


# ----------------------------------------------------------------------------- vs peft
def peft_wrap(module, targets, dtype_4bit: bool, adapter_dtype, gen):
    """peft LoRA (r=8, alpha=16, dropout 0) on module's targets, lora_B set to random non-zero."""
    if dtype_4bit:
        module.is_loaded_in_4bit = True  # what peft reads to dispatch lora.Linear4bit
    module = inject_adapter_in_model(
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets), module)
    for name in targets:
        layer = getattr(module, name)
        with torch.no_grad():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
        if adapter_dtype is not None:
            layer.lora_A.to(adapter_dtype)
            layer.lora_B.to(adapter_dtype)
    return module


def lora_params(module, targets):
    return [getattr(module, n).lora_A["default"].weight for n in targets] + \
           [getattr(module, n).lora_B["default"].weight for n in targets]


class Projections(nn.Module):
    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)


@pytest.mark.parametrize("kind,dtype,adapter_dtype", CONFIGS, ids=CONFIG_IDS)
def test_lora_linear_matches_peft(kind, dtype, adapter_dtype, kernel_mode):
    kernel_mode("triton")
    bias = dtype != torch.float16  # with and without a base bias
    gen = torch.Generator().manual_seed(seed_of("peft-linear", kind, dtype, adapter_dtype, bias))
    module = Projections(proj=make_base(kind, 20, 33, dtype, bias, gen))
    module = peft_wrap(module, ["proj"], kind == "4bit", adapter_dtype, gen)
    layer = module.proj
    assert type(layer).__name__ == ("Linear4bit" if kind == "4bit" else "Linear")
    params = lora_params(module, ["proj"])
    x = torch.randn(2, 7, 33, generator=gen).to(dtype).requires_grad_()
    compare(
        lambda t: lora.lora_linear(t, *lora.lora_parts(layer)), x, params,
        lambda t: layer(t), x, params,
        gen, tol(dtype),
    )


@pytest.mark.parametrize("kind,dtype,adapter_dtype", CONFIGS, ids=CONFIG_IDS)
def test_lora_qkv_matches_peft_gqa(kind, dtype, adapter_dtype, kernel_mode):
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(seed_of("peft-qkv", kind, dtype, adapter_dtype))
    targets = ["q_proj", "k_proj", "v_proj"]
    module = Projections(
        q_proj=make_base(kind, 32, 36, dtype, False, gen),
        k_proj=make_base(kind, 8, 36, dtype, False, gen),
        v_proj=make_base(kind, 8, 36, dtype, False, gen),
    )
    module = peft_wrap(module, targets, kind == "4bit", adapter_dtype, gen)
    params = lora_params(module, targets)
    x = torch.randn(2, 5, 36, generator=gen).to(dtype).requires_grad_()
    compare(
        lambda t: lora.lora_qkv(t, module.q_proj, module.k_proj, module.v_proj), x, params,
        lambda t: (module.q_proj(t), module.k_proj(t), module.v_proj(t)), x, params,
        gen, tol(dtype),
    )


def hf_mlp(activation, dtype, bias=False):
    """transformers' MLP with unaligned sizes (hidden 36, intermediate 70: no power of two, not a
    multiple of the kernels' blocks). The attention heads only satisfy the config's checks: 2 heads
    of 18 (transformers 5.18 on refuses RoPE over an odd head_dim such as 36 / 4 = 9)."""
    if activation == "geglu_tanh":
        return GemmaMLP(GemmaConfig(hidden_size=36, intermediate_size=70, hidden_act="gelu_pytorch_tanh",
                                num_attention_heads=2, num_key_value_heads=2, head_dim=18)).to(dtype)
    config = LlamaConfig(hidden_size=36, intermediate_size=70, hidden_act=ACT_TO_HF[activation], mlp_bias=bias,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaMLP(config).to(dtype)


def quantize_linears(module, names, dtype, gen):
    """Replace module's nn.Linear children by bitsandbytes Linear4bit holding the same weights."""
    for name in names:
        dense = getattr(module, name)
        q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                              compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        if dense.bias is not None:
            q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        setattr(module, name, q.to(dense.weight.device))
    return module


@pytest.mark.parametrize("config,activation", MLP_CASES, ids=MLP_IDS)
def test_lora_mlp_matches_peft_hf_mlp(config, activation, kernel_mode):
    """transformers' LlamaMLP (silu, gelu) / GemmaMLP (gelu_pytorch_tanh), peft LoRA on all three."""
    kernel_mode("triton")
    kind, dtype, adapter_dtype = config
    gen = torch.Generator().manual_seed(seed_of("peft-mlp", kind, dtype, adapter_dtype, activation))
    torch.manual_seed(seed_of("init", kind, dtype, activation))  # the HF module's own init
    targets = ["gate_proj", "up_proj", "down_proj"]
    mlp = hf_mlp(activation, dtype, bias=activation == "geglu")
    mlp.requires_grad_(False)
    if kind == "4bit":
        mlp = quantize_linears(mlp, targets, dtype, gen)
    mlp = peft_wrap(mlp, targets, kind == "4bit", adapter_dtype, gen)
    params = lora_params(mlp, targets)
    x = torch.randn(2, 9, 36, generator=gen).to(dtype).requires_grad_()
    compare(
        lambda t: lora.lora_mlp(t, mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation), x, params,
        lambda t: mlp(t), x, params,
        gen, tol(dtype),
    )


# ----------------------------------------------------------------------------- grads, memory, guards
@pytest.mark.parametrize("frozen", ["x", "A", "B", "A+B"])
@pytest.mark.parametrize("which", ["linear", "mlp"])
def test_only_requested_grads(frozen, which, kernel_mode):
    """Frozen tensors get no grad, the others the same grads as with everything trainable; a base
    nn.Linear whose weight requires grad is still treated as frozen."""
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(seed_of("frozen", frozen, which))
    if which == "linear":
        projections = [make_projection("dense", 19, 24, torch.float32, True, gen)]
    else:
        projections = [make_projection("dense", 30, 24, torch.float32, False, gen) for _ in range(2)]
        projections.append(make_projection("4bit", 24, 30, torch.float32, False, gen))
    projections[0].base.weight.requires_grad_(True)
    x = torch.randn(4, 24, generator=gen, requires_grad=True)
    run = (lambda t: lora.lora_linear(t, *projections[0])) if which == "linear" else \
          (lambda t: lora.lora_mlp(t, *projections))
    dy = torch.randn(4, 19 if which == "linear" else 24, generator=gen)
    all_params = leaves(projections)
    _, full = fwd_bwd(run, x, all_params, [dy])

    if "x" in frozen:
        x.requires_grad_(False)
    for p in projections:
        if "A" in frozen:
            p.lora_A.requires_grad_(False)
        if "B" in frozen:
            p.lora_B.requires_grad_(False)
    out = run(x)
    out.backward(dy)
    assert projections[0].base.weight.grad is None
    for t, g_full in zip([x, *all_params], full):
        if t.requires_grad:
            assert_close(t.grad, g_full, 1e-6)
        else:
            assert t.grad is None


def saved_numels(fn, x, params):
    """numel of every tensor autograd saves for fn(x), parameters and x itself excluded."""
    own = {t.data_ptr() for t in params}
    sizes = []

    def pack(t):
        if t.data_ptr() not in own:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sizes


def test_saved_tensors_are_x_gate_up_and_r_wide(kernel_mode):
    """The MLP saves X, g, u, the r-wide X [A_g; A_u]^T and h A_d^T, and the stacked [A_g; A_u] (a
    copy: r x in): no h, no act(g), no dequantized W. Q/K/V: X, X [A_q; A_k; A_v]^T, the stacked As."""
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(3)
    T, H, inter, r = 10, 24, 56, 4
    projections = [make_projection("4bit", inter, H, torch.float32, False, gen, r=r) for _ in range(2)]
    projections.append(make_projection("4bit", H, inter, torch.float32, False, gen, r=r))
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    sizes = saved_numels(lambda t: lora.lora_mlp(t, *projections), x, leaves(projections))
    assert sorted(sizes) == sorted([T * H, T * inter, T * inter, T * 2 * r, T * r, 2 * r * H])

    qkv = [make_projection("4bit", 32, H, torch.float32, False, gen, r=r)] + \
          [make_projection("4bit", 8, H, torch.float32, False, gen, r=r) for _ in range(2)]
    sizes = saved_numels(lambda t: lora.lora_qkv(t, *qkv), x, leaves(qkv))
    assert sorted(sizes) == sorted([T * H, T * 3 * r, 3 * r * H])


def test_training_steps_see_updated_lora_weights(kernel_mode):
    """Two optimizer steps through the fused path (fp32 LoRA over a bf16 base) give the same
    weights as the reference path: every step computes with the weights the last step made."""
    results = []
    for mode in ("triton", "reference"):
        kernel_mode(mode)
        gen = torch.Generator().manual_seed(11)
        p = make_projection("dense", 20, 32, torch.bfloat16, True, gen, adapter_dtype=torch.float32)
        start = (p.lora_A.detach().clone(), p.lora_B.detach().clone())
        opt = torch.optim.SGD([p.lora_A, p.lora_B], lr=0.5)
        x = torch.randn(6, 32, generator=gen, dtype=torch.bfloat16)
        for _ in range(3):  # steps 2 and 3 depend on the weights step 1 and 2 made
            lora.lora_linear(x, *p).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        results.append((p.lora_A.detach() - start[0], p.lora_B.detach() - start[1]))
    assert results[0][0].abs().max() > 0 and results[0][1].abs().max() > 0
    assert_close(results[0][0], results[1][0], 3e-2)  # the updates, not the (much larger) weights
    assert_close(results[0][1], results[1][1], 3e-2)


def test_mlp_backward_runs_once(kernel_mode):
    """The fused MLP backward overwrites its saved gate/up: a second backward must fail loudly."""
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(4)
    projections = [make_projection("dense", 20, 12, torch.float32, False, gen) for _ in range(2)]
    projections.append(make_projection("dense", 12, 20, torch.float32, False, gen))
    x = torch.randn(3, 12, generator=gen, requires_grad=True)
    y = lora.lora_mlp(x, *projections)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()


def test_autocast_computes_in_autocast_dtype(kernel_mode):
    """fp32 activations under autocast(bf16): bf16 output, fp32 grads, close to the fp32 reference."""
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(8)
    p = make_projection("4bit", 20, 32, torch.float32, True, gen)
    x = torch.randn(5, 32, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora.lora_linear(x, *p)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and p.lora_A.grad.dtype == torch.float32
    rp = upcast(p)
    xr = x.detach().double().requires_grad_()
    y_ref = lora.lora_linear_reference(xr, *rp)
    y_ref.sum().backward()
    assert_close(y, y_ref, 1e-2)
    assert_close(x.grad, xr.grad, 1e-2)
    assert_close(p.lora_A.grad, rp.lora_A.grad, 1e-2)


def test_reference_mode_and_cpu_auto_mode_agree(kernel_mode):
    gen = torch.Generator().manual_seed(9)
    p = make_projection("4bit", 20, 32, torch.float32, False, gen)
    x = torch.randn(2, 3, 32, generator=gen)
    kernel_mode("auto")  # CPU tensors: the reference
    y_auto = lora.lora_linear(x, *p)
    kernel_mode("triton")
    y_fused = lora.lora_linear(x, *p)
    assert_close(y_fused, y_auto, 1e-5)


def test_lora_parts_refuses_what_it_cannot_fuse():
    gen = torch.Generator().manual_seed(10)
    module = Projections(proj=make_base("dense", 8, 12, torch.float32, False, gen))
    with_dropout = inject_adapter_in_model(LoraConfig(r=4, lora_dropout=0.1, target_modules=["proj"]), module)
    with pytest.raises(ValueError, match="dropout"):
        lora.lora_parts(with_dropout.proj)
    module = Projections(proj=make_base("dense", 8, 12, torch.float32, False, gen))
    dora = inject_adapter_in_model(LoraConfig(r=4, use_dora=True, target_modules=["proj"]), module)
    with pytest.raises(ValueError, match="DoRA"):
        lora.lora_parts(dora.proj)
    with pytest.raises(TypeError):
        lora.lora_parts(nn.Linear(3, 3))


def test_lora_parts_reads_peft_layer():
    gen = torch.Generator().manual_seed(12)
    module = Projections(proj=make_base("4bit", 8, 12, torch.float32, True, gen))
    module = peft_wrap(module, ["proj"], True, None, gen)
    parts = lora.lora_parts(module.proj)
    assert parts.base is module.proj.base_layer
    assert parts.lora_A is module.proj.lora_A["default"].weight
    assert parts.lora_B is module.proj.lora_B["default"].weight
    assert parts.scaling == 2.0 and parts.bias is module.proj.base_layer.bias


def test_base_forms_agree(kernel_mode):
    """The base as a Linear4bit module, its Params4bit weight, or the dense dequantized tensor."""
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(13)
    p = make_projection("4bit", 20, 33, torch.float16, True, gen)
    dense = bnb.functional.dequantize_4bit(p.base.weight.data, p.base.weight.quant_state)
    x = torch.randn(3, 33, generator=gen).half()
    outs = [lora.lora_linear(x, base, p.lora_A, p.lora_B, p.scaling, p.bias) for base in (p.base, p.base.weight, dense)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_shape_errors():
    p = LoRAProjection(torch.randn(8, 12), torch.randn(4, 12), torch.randn(8, 4), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        lora.lora_linear(torch.randn(2, 13), *p)
    with pytest.raises(ValueError, match="activation"):
        lora.lora_mlp(torch.randn(2, 12), p, p, p, activation="relu")


# ----------------------------------------------------------------------------- GPU
def llama_projections(kind, dtype, H, inter, r, gen, bias=False, adapter_dtype=None):
    gate, up = (make_projection(kind, inter, H, dtype, bias, gen, r=r, adapter_dtype=adapter_dtype, device="cuda")
                for _ in range(2))
    down = make_projection(kind, H, inter, dtype, bias, gen, r=r, adapter_dtype=adapter_dtype, device="cuda")
    return gate, up, down


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh"])
def test_lora_mlp_gpu_llama3_8b(dtype, activation):
    """2x2048 tokens, hidden 4096, intermediate 14336, r=16, NF4 base: fused vs fp32 reference."""
    gen = torch.Generator().manual_seed(0)
    projections = llama_projections("4bit", dtype, 4096, 14336, 16, gen)
    x = (torch.randn(2, 2048, 4096, generator=gen) * 0.5).to("cuda", dtype).requires_grad_()
    ref = [upcast(p) for p in projections]
    compare(
        lambda t: lora.lora_mlp(t, *projections, activation), x, leaves(projections),
        lambda t: lora.lora_mlp_reference(t, *ref, activation), x.detach().double().requires_grad_(), leaves(ref),
        gen, tol(dtype),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_mlp_gpu_matches_peft_bnb(dtype):
    """A real peft-wrapped LlamaMLP over bitsandbytes Linear4bit on CUDA (llama-7b-ish widths)."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    targets = ["gate_proj", "up_proj", "down_proj"]
    mlp = LlamaMLP(LlamaConfig(hidden_size=2048, intermediate_size=5632, hidden_act="silu")).to(dtype)
    mlp.requires_grad_(False)
    mlp = quantize_linears(mlp.cuda(), targets, dtype, gen)
    mlp = peft_wrap(mlp, targets, True, torch.float32, gen)
    params = lora_params(mlp, targets)
    x = torch.randn(2, 1024, 2048, generator=gen).to("cuda", dtype).requires_grad_()
    compare(
        lambda t: lora.lora_mlp(t, mlp.gate_proj, mlp.up_proj, mlp.down_proj), x, params,
        lambda t: mlp(t), x, params,
        gen, tol(dtype),
    )


@pytest.mark.gpu
def test_lora_mlp_gpu_uses_less_memory_than_peft():
    """Peak memory of forward + backward at llama3-8b sizes (fp16, NF4 base): fused < peft."""
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    targets = ["gate_proj", "up_proj", "down_proj"]
    mlp = LlamaMLP(LlamaConfig(hidden_size=4096, intermediate_size=14336, hidden_act="silu")).half()
    mlp.requires_grad_(False)
    mlp = quantize_linears(mlp.cuda(), targets, torch.float16, gen)
    mlp = peft_wrap(mlp, targets, True, None, gen)
    x = torch.randn(2, 2048, 4096, generator=gen).to("cuda", torch.float16).requires_grad_()
    dy = torch.randn(2, 2048, 4096, generator=gen).to("cuda", torch.float16)

    def peak(fn):
        fn(x).backward(dy)
        torch.cuda.synchronize()
        x.grad = None
        for p in lora_params(mlp, targets):
            p.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(x).backward(dy)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = peak(lambda t: lora.lora_mlp(t, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    eager = peak(mlp)
    assert fused < eager, f"fused peak {fused / 2**20:.0f} MiB, peft {eager / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_lora_qkv_gpu_llama3_8b(dtype, kind):
    """Q 4096, K/V 1024 (GQA 8 kv heads), 4096 tokens, r=16; fp32 adapters on the dense base."""
    gen = torch.Generator().manual_seed(3)
    adapter = torch.float32 if kind == "dense" else None
    q = make_projection(kind, 4096, 4096, dtype, False, gen, r=16, adapter_dtype=adapter, device="cuda")
    k, v = (make_projection(kind, 1024, 4096, dtype, False, gen, r=16, adapter_dtype=adapter, device="cuda")
            for _ in range(2))
    x = torch.randn(2, 2048, 4096, generator=gen).to("cuda", dtype).requires_grad_()
    ref = [upcast(p) for p in (q, k, v)]
    compare(
        lambda t: lora.lora_qkv(t, q, k, v), x, leaves([q, k, v]),
        lambda t: lora.lora_qkv_reference(t, *ref), x.detach().double().requires_grad_(), leaves(ref),
        gen, tol(dtype),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_linear_gpu_bias_odd_sizes(dtype):
    gen = torch.Generator().manual_seed(4)
    p = make_projection("4bit", 4099, 1031, dtype, True, gen, r=16, device="cuda")
    x = torch.randn(3, 333, 1031, generator=gen).to("cuda", dtype).requires_grad_()
    rp = upcast(p)
    compare(
        lambda t: lora.lora_linear(t, *p), x, leaves([p]),
        lambda t: lora.lora_linear_reference(t, *rp), x.detach().double().requires_grad_(), leaves([rp]),
        gen, tol(dtype),
    )


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_wide_gemm_switch(value, on):
    """NBTUNE_WIDE_GEMM=0 starts with the 16-bit GEMM plus cast (to compare both on one GPU)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NBTUNE_WIDE_GEMM"} | ({"NBTUNE_WIDE_GEMM": value} if value else {})
    out = subprocess.run([sys.executable, "-c", "import nbtune.kernels.lora as l; print(l._WIDE_GEMM['ok'])"],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout.split()[-1]
    assert out == str(on)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapter_grads_come_from_wide_gemms_gpu(dtype):
    """fp32 adapters (peft's default) over a 16-bit NF4 base: the LoRA grads are written in fp32 by
    cuBLAS (``addmm``'s out_dtype) rather than rounded to 16 bits and cast; they match the fp32
    reference at the 16-bit tolerance, odd sizes included (Q/K/V-like projections and the MLP), and
    come back fp32 (``compare`` checks each grad's dtype against its parameter's)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (make_projection("4bit", n, 1031, dtype, False, gen, r=8, adapter_dtype=torch.float32, device="cuda")
               for n in (1031, 259, 259))
    mlp = llama_projections("4bit", dtype, 1031, 2819, 8, gen, adapter_dtype=torch.float32)
    x = torch.randn(3, 333, 1031, generator=gen).to("cuda", dtype).requires_grad_()
    ref_qkv, ref_mlp = [upcast(p) for p in (q, k, v)], [upcast(p) for p in mlp]
    compare(
        lambda t: lora.lora_qkv(t, q, k, v), x, leaves([q, k, v]),
        lambda t: lora.lora_qkv_reference(t, *ref_qkv), x.detach().double().requires_grad_(), leaves(ref_qkv),
        gen, tol(dtype),
    )
    compare(
        lambda t: lora.lora_mlp(t, *mlp), x, leaves(mlp),
        lambda t: lora.lora_mlp_reference(t, *ref_mlp), x.detach().double().requires_grad_(), leaves(ref_mlp),
        gen, tol(dtype),
    )
    assert lora._WIDE_GEMM["ok"], "the fp32-output GEMM was refused on this GPU: grads fell back to casts"
