"""LoRA over a bitsandbytes NF4 base at llama3-8b sizes: nbtune's fused LoRA vs peft over bnb.

Sizes: 2x2048 tokens, hidden 4096, intermediate 14336, GQA K/V 1024 wide, r=16, lora_alpha=16,
dropout 0, adapters in the compute dtype. ``eager`` is real peft: a transformers ``LlamaMLP`` (or
a module of q/k/v projections) whose nn.Linear layers are replaced by ``bitsandbytes.nn.Linear4bit``
(NF4, double-quantized, built on CUDA), wrapped by peft's ``inject_adapter_in_model``; ``nbtune``
runs ``lora_mlp`` / ``lora_qkv`` / ``lora_linear`` on the very same modules' weights (through
``lora_parts``). fwd+bwd cases compute dX and every LoRA grad with ``torch.autograd.grad`` (no
.grad accumulation on either side). bnb and peft cannot be torch.compiled usefully, so the runner
adds no ``compile`` impl. Compute-bound: ``flops`` counts the base GEMMs only (forward X W^T,
backward dX = dY W; no dW anywhere), the LoRA matmuls are < 1% on top.

Acceptance (the issue): nbtune's MLP fwd+bwd >= 2x faster than peft over bnb Linear4bit. Note
both sides run the same six base GEMMs (~2.9 TFLOP); what nbtune removes is the elementwise and
bookkeeping traffic around them, so the ratio is bounded by how much of peft's time that is.
"""
from __future__ import annotations

import torch

from . import Case

BATCH, SEQ = 2, 2048
HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024
RANK, ALPHA = 16, 16
DEVICE = "cuda"  # inputs are only ever made on the GPU machine


def _quantize_linears(module, names, dtype):
    """Replace module's nn.Linear children by bnb Linear4bit (NF4, double quant) with the same weights."""
    import bitsandbytes as bnb

    for name in names:
        dense = getattr(module, name)
        q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=dtype,
                              quant_type="nf4", compress_statistics=True, device="meta")
        q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        setattr(module, name, q.to(DEVICE))  # quantizes on the GPU
        del dense
    return module


def _peft(module, targets, dtype):
    from peft import LoraConfig, inject_adapter_in_model

    module.is_loaded_in_4bit = True  # peft then dispatches its lora.Linear4bit
    module = inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets), module)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params = []
    for name in targets:
        layer = getattr(module, name)
        layer.lora_A.to(dtype)
        layer.lora_B.to(dtype)
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, device=DEVICE) * 0.01)
            p.requires_grad_(True)
            params.append(p)
    return module, params


class _Projections(torch.nn.Module):
    def __init__(self, **shapes):
        super().__init__()
        for name, (n_in, n_out) in shapes.items():
            setattr(self, name, torch.nn.Linear(n_in, n_out, bias=False))


def _make_mlp(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    targets = ["gate_proj", "up_proj", "down_proj"]
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="silu",
                         num_attention_heads=32, num_key_value_heads=8)
    with torch.device(DEVICE):
        mlp = LlamaMLP(config).to(dtype)
    mlp.requires_grad_(False)
    return _peft(_quantize_linears(mlp, targets, dtype), targets, dtype)


def _make_qkv(dtype):
    targets = ["q_proj", "k_proj", "v_proj"]
    with torch.device(DEVICE):
        module = _Projections(q_proj=(HIDDEN, HIDDEN), k_proj=(HIDDEN, KV), v_proj=(HIDDEN, KV)).to(dtype)
    module.requires_grad_(False)
    return _peft(_quantize_linears(module, targets, dtype), targets, dtype)


def _make_linear(dtype):
    targets = ["gate_proj"]
    with torch.device(DEVICE):
        module = _Projections(gate_proj=(HIDDEN, INTERMEDIATE)).to(dtype)
    module.requires_grad_(False)
    return _peft(_quantize_linears(module, targets, dtype), targets, dtype)


def _inputs(make_module, dtype, n_out):
    def make():
        module, params = make_module(dtype)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        x = torch.randn(BATCH, SEQ, HIDDEN, generator=gen, device=DEVICE, dtype=dtype).requires_grad_()
        dys = tuple(torch.randn(BATCH, SEQ, n, generator=gen, device=DEVICE, dtype=dtype) for n in n_out)
        return x, dys, module, params
    return make


def _fwd_bwd(forward):
    def run(x, dys, module, params):
        outs = forward(x, module)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, [x, *params], dys)
    return run


def _fwd(forward):
    def run(x, dys, module, params):
        with torch.no_grad():
            return forward(x, module)
    return run


def cases(dtype: torch.dtype) -> list[Case]:
    if dtype not in (torch.float16, torch.bfloat16):
        return []
    from nbtune.kernels import lora_linear, lora_mlp, lora_qkv
    from nbtune.kernels.lora import lora_parts

    def nbtune_mlp(x, m):
        return lora_mlp(x, m.gate_proj, m.up_proj, m.down_proj, "swiglu")

    def peft_mlp(x, m):
        return m(x)

    def nbtune_qkv(x, m):
        return lora_qkv(x, m.q_proj, m.k_proj, m.v_proj)

    def peft_qkv(x, m):
        return m.q_proj(x), m.k_proj(x), m.v_proj(x)

    def nbtune_linear(x, m):
        return lora_linear(x, *lora_parts(m.gate_proj))

    def peft_linear(x, m):
        return m.gate_proj(x)

    tokens = BATCH * SEQ
    mlp_flops = 2 * tokens * HIDDEN * INTERMEDIATE * 3  # one pass of the three base GEMMs
    qkv_flops = 2 * tokens * HIDDEN * (HIDDEN + 2 * KV)
    linear_flops = 2 * tokens * HIDDEN * INTERMEDIATE
    common = dict(bytes_moved=None, memory_bound=False, compile_eager=False)
    return [
        Case(kernel="lora", name=f"mlp nf4 r{RANK} fwd+bwd {tokens}x{HIDDEN}x{INTERMEDIATE}",
             make_inputs=_inputs(_make_mlp, dtype, [HIDDEN]),
             impls={"nbtune": _fwd_bwd(nbtune_mlp), "eager": _fwd_bwd(peft_mlp)}, flops=2 * mlp_flops, **common),
        Case(kernel="lora", name=f"mlp nf4 r{RANK} fwd {tokens}x{HIDDEN}x{INTERMEDIATE}",
             make_inputs=_inputs(_make_mlp, dtype, [HIDDEN]),
             impls={"nbtune": _fwd(nbtune_mlp), "eager": _fwd(peft_mlp)}, flops=mlp_flops, **common),
        Case(kernel="lora", name=f"qkv nf4 r{RANK} fwd+bwd {tokens}x{HIDDEN}->{HIDDEN}+2x{KV}",
             make_inputs=_inputs(_make_qkv, dtype, [HIDDEN, KV, KV]),
             impls={"nbtune": _fwd_bwd(nbtune_qkv), "eager": _fwd_bwd(peft_qkv)}, flops=2 * qkv_flops, **common),
        Case(kernel="lora", name=f"linear nf4 r{RANK} fwd+bwd {tokens}x{HIDDEN}->{INTERMEDIATE}",
             make_inputs=_inputs(_make_linear, dtype, [INTERMEDIATE]),
             impls={"nbtune": _fwd_bwd(nbtune_linear), "eager": _fwd_bwd(peft_linear)}, flops=2 * linear_flops,
             **common),
    ]
