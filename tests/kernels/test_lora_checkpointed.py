"""lora_mlp(checkpointed_tail=True): the LoRA MLP as the last op of a checkpointed layer.

Its forward computes y token chunk by token chunk and saves X alone; inside the recompute of torch's
non-reentrant checkpoint it computes nothing; its backward rebuilds gate/up chunk by chunk. Checked
against the fp32 reference (no checkpoint) for outputs and every gradient, with one chunk and with
several (odd token counts, uneven last chunk), in and out of a checkpoint, and by counting the
dequantizations each pass runs (the recompute's MLP must be gone).
"""
import pytest
import torch

from nbtune import _chunking
from nbtune.kernels import lora
from nbtune.kernels.offload import checkpoint_phase, offloaded_checkpoint, offloaded_checkpoint_reference

from test_lora import CONFIG_IDS, CONFIGS, assert_close, leaves, make_projection, saved_numels, seed_of, tol, upcast


class _Layer(torch.nn.Module):
    """x + mlp(x): the shape of a transformers decoder layer's MLP half (output only summed)."""

    def __init__(self, projections, activation, tail):
        super().__init__()
        self.projections, self.activation, self.tail = projections, activation, tail

    def forward(self, x):
        return x + lora.lora_mlp(x, *self.projections, self.activation, checkpointed_tail=self.tail)


def _mlp(kind, dtype, adapter_dtype, hidden, inter, gen, bias=False):
    gate, up = (make_projection(kind, inter, hidden, dtype, bias, gen, adapter_dtype=adapter_dtype) for _ in range(2))
    down = make_projection(kind, hidden, inter, dtype, bias, gen, r=4, adapter_dtype=adapter_dtype)
    return [gate, up, down]


def _run(layer, x, grad_out, checkpoint):
    x = x.detach().requires_grad_()
    out = checkpoint(layer, x) if checkpoint is not None else layer(x)
    params = leaves(layer.projections)
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    return out, grads


def _reference(projections, activation, x, grad_out):
    ref = [upcast(p) for p in projections]
    xr = x.detach().double().requires_grad_()
    out = xr + lora.lora_mlp_reference(xr, *ref, activation).double()
    grads = torch.autograd.grad(out, [xr, *leaves(ref)], grad_out.double())
    return out, grads


CHECKPOINTS = {"none": None, "torch": offloaded_checkpoint_reference, "offloaded": offloaded_checkpoint}


@pytest.mark.parametrize("kind,dtype,adapter_dtype", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("budget", [None, 1], ids=["one-chunk", "64-row-chunks"])
@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
def test_matches_reference(kind, dtype, adapter_dtype, budget, checkpoint, kernel_mode, monkeypatch):
    kernel_mode("triton")
    if budget is not None:  # 1 byte: every chunk is the 64-row minimum; 150 tokens -> 64 + 64 + 22
        monkeypatch.setattr(_chunking, "MLP_CHUNK_BYTES", budget)
    gen = torch.Generator().manual_seed(seed_of("tail", kind, dtype, adapter_dtype, budget, checkpoint))
    hidden, inter = 36, 70
    projections = _mlp(kind, dtype, adapter_dtype, hidden, inter, gen, bias=budget is None)
    x = torch.randn(3, 50, hidden, generator=gen).to(dtype)
    grad_out = torch.randn(3, 50, hidden, generator=gen).to(dtype)
    out, grads = _run(_Layer(projections, "swiglu", tail=True), x, grad_out, CHECKPOINTS[checkpoint])
    ref_out, ref_grads = _reference(projections, "swiglu", x, grad_out)
    assert out.dtype == dtype
    assert_close(out, ref_out, tol(dtype), "output")
    names = ["x"] + [f"{p}.{ab}" for p in ("gate", "up", "down") for ab in "AB"]
    for name, g, rg, p in zip(names, grads, ref_grads, [x, *leaves(projections)]):
        assert g.dtype == (dtype if name == "x" else p.dtype), name
        assert_close(g, rg, tol(dtype), name)


@pytest.mark.parametrize("activation", ["geglu", "geglu_tanh"])
def test_geglu_in_checkpoint_with_chunks(activation, kernel_mode, monkeypatch):
    kernel_mode("triton")
    monkeypatch.setattr(_chunking, "MLP_CHUNK_BYTES", 1)
    gen = torch.Generator().manual_seed(seed_of("tail-geglu", activation))
    projections = _mlp("4bit", torch.float16, torch.float32, 32, 48, gen)
    x = torch.randn(1, 131, 32, generator=gen).to(torch.float16)
    grad_out = torch.randn(1, 131, 32, generator=gen).to(torch.float16)
    out, grads = _run(_Layer(projections, activation, tail=True), x, grad_out, offloaded_checkpoint_reference)
    ref_out, ref_grads = _reference(projections, activation, x, grad_out)
    assert_close(out, ref_out, 1e-2, "output")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_close(g, rg, 1e-2, f"grad {i}")


def _count_dequantizations(monkeypatch):
    calls = []
    original = lora._weight

    def counting(base, dtype):
        calls.append(checkpoint_phase().name if checkpoint_phase() is not None else "backward")
        return original(base, dtype)

    monkeypatch.setattr(lora, "_weight", counting)
    return calls


@pytest.mark.parametrize("budget,chunks", [(None, 1), (1, 3)])
def test_recompute_runs_no_mlp(budget, chunks, kernel_mode, monkeypatch):
    """Per chunk: 3 dequantizations in the forward, none in the recompute, 5 in the backward (gate,
    up again for g, u; down for dh; gate, up for dX). The plain fused MLP runs 3 + 3 + 3."""
    kernel_mode("triton")
    if budget is not None:
        monkeypatch.setattr(_chunking, "MLP_CHUNK_BYTES", budget)
    gen = torch.Generator().manual_seed(5)
    projections = _mlp("4bit", torch.float32, torch.float32, 24, 40, gen)
    x = torch.randn(150, 24, generator=gen)
    calls = _count_dequantizations(monkeypatch)
    out = offloaded_checkpoint_reference(_Layer(projections, "swiglu", tail=True), x.requires_grad_())
    out.sum().backward()
    assert calls.count("forward") == 3 * chunks
    assert calls.count("recompute") == 0
    assert calls.count("backward") == 5 * chunks

    calls.clear()
    out = offloaded_checkpoint_reference(_Layer(projections, "swiglu", tail=False), x)
    out.sum().backward()
    assert (calls.count("forward"), calls.count("recompute"), calls.count("backward")) == (3, 3, 3)


def test_saves_x_only_and_allows_a_second_backward(kernel_mode):
    """Outside a checkpoint: X is the only (tokens x features) tensor saved (fp32 adapters in an
    fp32 compute: no cast copies; besides X only the stacked [A_g; A_u], r x in), and nothing
    saved is overwritten, so retain_graph works."""
    kernel_mode("triton")
    gen = torch.Generator().manual_seed(6)
    T, H, inter = 10, 24, 56
    projections = _mlp("4bit", torch.float32, torch.float32, H, inter, gen)
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    fused = lambda t: lora.lora_mlp(t, *projections, checkpointed_tail=True)  # noqa: E731
    r = projections[0].lora_A.shape[0]
    assert sorted(saved_numels(fused, x, leaves(projections))) == sorted([T * H, 2 * r * H])
    y = fused(x)
    first = torch.autograd.grad(y.sum(), [x], retain_graph=True)[0]
    second = torch.autograd.grad(y.sum(), [x])[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("tokens,inter,elem,budget", [
    (4096, 14336, 2, None), (8192, 14336, 2, None), (49152, 14336, 2, None), (150, 70, 4, 1),
    (1, 11008, 2, None), (0, 64, 2, None), (4097, 11008, 2, 2**20),
])
def test_token_chunks_cover_and_fit(tokens, inter, elem, budget):
    chunks = lora.mlp_token_chunks(tokens, inter, elem, budget)
    assert chunks[0][0] == 0 and chunks[-1][1] == tokens
    assert all(a < b for a, b in chunks) or tokens == 0
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(chunks, chunks[1:]))
    rows = chunks[0][1] - chunks[0][0]
    assert rows % 64 == 0 or len(chunks) == 1
    limit = _chunking.MLP_CHUNK_BYTES if budget is None else budget
    assert rows * inter * elem <= limit or rows <= 64
    if tokens * inter * elem <= limit:
        assert len(chunks) == 1


def test_llama3_8b_sizes_chunk_as_documented():
    """2x2048 tokens run in one chunk (no speed cost), 48k tokens in 4,480-row chunks."""
    assert len(lora.mlp_token_chunks(4096, 14336, 2)) == 1
    assert len(lora.mlp_token_chunks(8192, 14336, 2)) == 2
    chunks = lora.mlp_token_chunks(49152, 14336, 2)
    assert len(chunks) == 11 and chunks[0] == (0, 4480)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [4096, 8200])
def test_gpu_llama3_8b_tail_matches_reference(dtype, tokens):
    """llama3-8b MLP (4096 -> 14336, r=16, NF4, fp32 adapters) as the checkpointed tail under
    offloaded_checkpoint, one chunk (4096 tokens) and two (8200: 4160 + 4040): output and all
    grads against the fp32 reference."""
    from test_lora import llama_projections

    gen = torch.Generator().manual_seed(seed_of("gpu-tail", dtype, tokens))
    projections = list(llama_projections("4bit", dtype, 4096, 14336, 16, gen, adapter_dtype=torch.float32))
    x = (torch.randn(1, tokens, 4096, generator=gen) * 0.5).to("cuda", dtype)
    grad_out = torch.randn(1, tokens, 4096, generator=gen).to("cuda", dtype)
    out, grads = _run(_Layer(projections, "swiglu", tail=True), x, grad_out, offloaded_checkpoint)
    ref_out, ref_grads = _reference(projections, "swiglu", x, grad_out)
    assert_close(out, ref_out, tol(dtype), "output")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_close(g, rg, tol(dtype), f"grad {i}")


@pytest.mark.gpu
def test_gpu_tail_peak_memory_is_one_chunk():
    """At 16,384 tokens (4 chunks) the checkpointed step's peak over its input state is well below
    the plain fused MLP's, which holds g, u and dh for all tokens (3 x 448 MiB in bf16)."""
    from test_lora import llama_projections

    gen = torch.Generator().manual_seed(12)
    projections = list(llama_projections("4bit", torch.bfloat16, 4096, 14336, 16, gen, adapter_dtype=torch.float32))
    x = (torch.randn(1, 16384, 4096, generator=gen) * 0.5).to("cuda", torch.bfloat16)
    grad_out = torch.randn(1, 16384, 4096, generator=gen).to("cuda", torch.bfloat16)

    def peak(tail):
        layer = _Layer(projections, "swiglu", tail=tail)
        _run(layer, x, grad_out, offloaded_checkpoint)  # warm-up: kernels compiled, pools filled
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _run(layer, x, grad_out, offloaded_checkpoint)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    tail, plain = peak(True), peak(False)
    assert tail < plain - 700, f"tail {tail:.0f} MiB vs plain fused {plain:.0f} MiB"
