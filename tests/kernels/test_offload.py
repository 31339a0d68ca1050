"""Tests for nbtune.kernels.offload: checkpointing that keeps layer inputs in pinned CPU memory.

CPU (CI): gradients equal to no checkpointing and to torch's checkpoint (dropout with RNG
restore, autocast, tuple outputs, kwargs, non-tensor args, inputs without grad, extra tensor
args with grad, reentrant and non-reentrant), on the reference path (plain recomputation, what
runs on CPU) and on the offload machinery forced onto CPU tensors (NBTUNE_KERNELS=triton:
host copies, forward-order registry, prefetch, buffer pool), plus a tiny random Llama with peft
LoRA. GPU (marker gpu): the same equivalences on CUDA, peak memory below torch's checkpoint for
16 layers with large hidden states, pinned buffers reused across steps.
"""
from __future__ import annotations

import copy
import functools
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from nbtune.kernels import offload
from nbtune.kernels.offload import (
    enable_offloaded_checkpointing,
    offload_stats,
    offloaded_checkpoint,
    offloaded_checkpoint_reference,
    reset_offload_stats,
)


@pytest.fixture(autouse=True)
def _no_reserved_tokens():
    """A run earlier in this process (the trainer reserves its longest micro-batch) must not size
    these tests' buffers."""
    offload.reserve_tokens(None)
    yield
    offload.reserve_tokens(None)

FP32_TOL = dict(rtol=1e-5, atol=1e-6)


class LoraBlock(nn.Module):
    """A residual MLP block with frozen base weights and trainable low-rank adapters, like a
    QLoRA decoder layer in miniature; optional dropout between the two projections."""

    def __init__(self, hidden: int, inner: int, rank: int = 4, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(hidden, inner, bias=False).requires_grad_(False)
        self.down = nn.Linear(inner, hidden, bias=False).requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, hidden) / hidden**0.5)
        self.lora_b = nn.Parameter(torch.randn(inner, rank) / rank**0.5)
        self.dropout = dropout

    def forward(self, x, scale: float = 1.0, gate=None):
        h = self.up(x) + scale * (x @ self.lora_a.t()) @ self.lora_b.t()
        h = F.silu(h)
        if gate is not None:
            h = h * gate
        h = F.dropout(h, p=self.dropout, training=self.dropout > 0)
        return x + self.down(h)


def make_stack(n_layers=4, hidden=24, inner=40, dropout=0.0, seed=0, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.ModuleList(LoraBlock(hidden, inner, dropout=dropout) for _ in range(n_layers)).to(device, dtype)


def run_stack(layers, x, checkpoint_fn=None, **call_kwargs):
    """One forward + backward; returns (loss, input grad, {param name: grad})."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    for p in layers.parameters():
        p.grad = None
    h = x * 1.0 if x.requires_grad else x
    for layer in layers:
        h = layer(h, **call_kwargs) if checkpoint_fn is None else checkpoint_fn(layer, h, **call_kwargs)
    loss = (h.float() ** 2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layers.named_parameters() if p.requires_grad}
    return loss.detach(), (x.grad.clone() if x.requires_grad else None), grads


def assert_same_step(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    if a[1] is None:
        assert b[1] is None
    else:
        torch.testing.assert_close(a[1], b[1], **tol)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        assert a[2][name].abs().sum() > 0, f"{name} got a zero gradient"
        torch.testing.assert_close(a[2][name], b[2][name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def _fresh_stats():
    reset_offload_stats()
    yield


# ---------------------------------------------------------------- CPU: equivalence ---------


@pytest.mark.parametrize("mode", ["auto", "triton"])  # reference path / machinery forced on CPU
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("shape,seed", [((2, 7, 24), 1), ((3, 5, 24), 2), ((1, 1, 24), 3)])
def test_stack_matches_no_checkpoint(kernel_mode, mode, use_reentrant, shape, seed):
    kernel_mode(mode)
    layers = make_stack(seed=seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100), requires_grad=True)
    expected = run_stack(layers, x)
    got = run_stack(layers, x, functools.partial(offloaded_checkpoint, use_reentrant=use_reentrant))
    assert_same_step(got, expected, **FP32_TOL)
    stats = offload_stats()
    assert stats["calls"] == (len(layers) if mode == "triton" else 0)
    assert stats["offloaded"] == stats["calls"]


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_dropout_rng_restored(kernel_mode, mode):
    """Dropout in the recompute draws the forward's masks: identical to torch's checkpoint and to
    no checkpointing at all."""
    kernel_mode(mode)
    layers = make_stack(n_layers=3, dropout=0.3, seed=5)
    x = torch.randn(2, 9, 24, requires_grad=True)
    results = {}
    for name, fn in [
        ("none", None),
        ("torch", functools.partial(torch_checkpoint, use_reentrant=False)),
        ("offload", offloaded_checkpoint),
        ("offload_reentrant", functools.partial(offloaded_checkpoint, use_reentrant=True)),
    ]:
        torch.manual_seed(1234)
        results[name] = run_stack(layers, x, fn)
    for name in ("offload", "offload_reentrant"):
        assert_same_step(results[name], results["torch"], rtol=0, atol=0)
        assert_same_step(results[name], results["none"], **FP32_TOL)
    # The masks really drop something: a run with another seed differs.
    torch.manual_seed(999)
    other = run_stack(layers, x, offloaded_checkpoint)
    assert not torch.allclose(other[1], results["offload"][1])


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_tuple_outputs_kwargs_and_non_tensor_args(kernel_mode, mode):
    kernel_mode(mode)
    torch.manual_seed(7)
    block = LoraBlock(16, 32)
    gate = torch.rand(2, 5, 32, requires_grad=True)  # a second tensor that requires grad, as a kwarg
    x = torch.randn(2, 5, 16, requires_grad=True)

    def layer(h, scale, tag, nothing, *, gate, square: bool):
        assert tag == "block" and nothing is None and isinstance(scale, float)
        out = block(h, scale=scale, gate=gate)
        aux = out.pow(2).sum(-1) if square else out.sum(-1)
        return out, aux, tag  # a tuple with a non-tensor in it

    def step(fn):
        for t in (x, gate, block.lora_a, block.lora_b):
            t.grad = None
        out, aux, tag = fn(layer, x * 1.0, 0.5, "block", None, gate=gate, square=True)
        assert tag == "block"
        (out.sum() + aux.mean()).backward()
        return [t.grad.clone() for t in (x, gate, block.lora_a, block.lora_b)]

    expected = step(lambda f, *a, **k: f(*a, **k))
    for got in (step(offloaded_checkpoint), step(functools.partial(offloaded_checkpoint, use_reentrant=False))):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **FP32_TOL)


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_lora_grads_flow_when_input_does_not_require_grad(kernel_mode, mode):
    """Non-reentrant: parameters captured inside ``function`` get gradients through the recompute
    even though no input requires grad (what a frozen embedding feeds the first layer)."""
    kernel_mode(mode)
    layers = make_stack(n_layers=3, seed=11)
    x = torch.randn(2, 6, 24)  # requires_grad=False
    expected = run_stack(layers, x)
    got = run_stack(layers, x, offloaded_checkpoint)
    assert got[1] is None
    assert_same_step(got, expected, **FP32_TOL)


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_extra_tensor_arg_and_kwargs_through_stack(kernel_mode, mode):
    kernel_mode(mode)
    layers = make_stack(n_layers=3, seed=13)
    x = torch.randn(2, 4, 24, requires_grad=True)
    gate = torch.rand(40)
    expected = run_stack(layers, x, scale=0.7, gate=gate)
    got = run_stack(layers, x, offloaded_checkpoint, scale=0.7, gate=gate)
    assert_same_step(got, expected, **FP32_TOL)


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_autocast_state_restored(kernel_mode, mode):
    """The recompute runs under the forward's autocast settings (bf16 on CPU here)."""
    kernel_mode(mode)
    layers = make_stack(n_layers=3, seed=17)
    x = torch.randn(2, 8, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = run_stack(layers, x)
        got = run_stack(layers, x, offloaded_checkpoint)
    assert_same_step(got, expected, **FP32_TOL)
    # and the bf16 run is a real bf16 run (differs from fp32 by more than the tolerance)
    fp32 = run_stack(layers, x)
    assert not torch.allclose(fp32[1], got[1], **FP32_TOL)


def test_autograd_grad_and_retain_graph(kernel_mode):
    """torch.autograd.grad works and a second backward over a retained graph fetches the input
    again from its host copy."""
    kernel_mode("triton")
    layers = make_stack(n_layers=4, seed=19)
    params = [p for p in layers.parameters() if p.requires_grad]
    x = torch.randn(3, 4, 24, requires_grad=True)

    def loss_of(fn):
        h = x * 1.0
        for layer in layers:
            h = fn(layer, h)
        return (h**2).mean()

    expected = torch.autograd.grad(loss_of(lambda f, h: f(h)), [x] + params)
    loss = loss_of(offloaded_checkpoint)
    first = torch.autograd.grad(loss, [x] + params, retain_graph=True)
    second = torch.autograd.grad(loss, [x] + params)
    for a, b, e in zip(first, second, expected):
        torch.testing.assert_close(a, e, **FP32_TOL)
        torch.testing.assert_close(b, e, **FP32_TOL)
    stats = offload_stats()
    assert stats["offloaded"] == 4
    assert stats["fetched"] >= 2  # the second pass copies back what the first one consumed


# ---------------------------------------------------------- CPU: the offload machinery ------


def forward_tracking_inputs(layers, x, fn):
    """Forward through the stack keeping only weak references to each layer's input."""
    h = x * 1.0
    refs = []
    for layer in layers:
        layer_input = h
        h = fn(layer, layer_input)
        refs.append(weakref.ref(layer_input))
        del layer_input
    return h, refs


def test_inputs_are_freed_after_forward_and_prefetched_in_backward(kernel_mode):
    """Forced onto CPU tensors, the machinery behaves as on the GPU: after the forward only the
    last DEVICE_WINDOW layer inputs are still alive (torch's checkpoint keeps all of them), the
    backward serves those directly and prefetches every other one, never fetching on demand."""
    n = 6
    layers = make_stack(n_layers=n, seed=23)
    x = torch.randn(2, 5, 24, requires_grad=True)

    kernel_mode("reference")
    out, refs = forward_tracking_inputs(layers, x, offloaded_checkpoint)
    assert all(r() is not None for r in refs), "torch's checkpoint keeps every input"
    out.sum().backward()
    expected = x.grad.clone()
    x.grad = None

    kernel_mode("triton")
    gc.collect()  # no handle of an earlier test may be left to prefetch
    reset_offload_stats()
    out, refs = forward_tracking_inputs(layers, x, offloaded_checkpoint)
    gc.collect()
    alive = [r() is not None for r in refs]
    window = offload.DEVICE_WINDOW
    assert alive == [False] * (n - window) + [True] * window
    out.sum().backward()
    torch.testing.assert_close(x.grad, expected, **FP32_TOL)
    stats = offload_stats()
    assert stats["offloaded"] == n
    assert stats["from_device"] == window
    assert stats["prefetched"] == n - window
    assert stats["prefetch_used"] == n - window
    assert stats["fetched"] == 0


def test_unpack_order_follows_forward_order_reversed(kernel_mode, monkeypatch):
    kernel_mode("triton")
    n = 5
    layers = make_stack(n_layers=n, seed=29)
    order = []
    real_unpack = offload._OffloadedInput.unpack

    def logging_unpack(self):
        order.append(self.index)
        return real_unpack(self)

    monkeypatch.setattr(offload._OffloadedInput, "unpack", logging_unpack)
    created = []
    real_init = offload._OffloadedInput.__init__

    def counting_init(self, tensor):
        self.index = len(created)
        created.append(self.index)
        real_init(self, tensor)

    monkeypatch.setattr(offload._OffloadedInput, "__init__", counting_init)
    run_stack(layers, torch.randn(2, 3, 24, requires_grad=True), offloaded_checkpoint)
    assert order == list(reversed(range(n)))


def test_host_buffers_reused_across_steps(kernel_mode):
    kernel_mode("triton")
    offload.release_pinned_memory()
    n = 5
    layers = make_stack(n_layers=n, seed=31)
    x = torch.randn(2, 8, 24, requires_grad=True)
    first = run_stack(layers, x, offloaded_checkpoint)
    gc.collect()
    after_first = offload_stats()
    assert after_first["pool_takes"] == n and after_first["pool_reuses"] == 0
    assert after_first["pool_buffers"] >= n
    second = run_stack(layers, x, offloaded_checkpoint)
    after_second = offload_stats()
    assert after_second["pool_slabs"] == after_first["pool_slabs"], "no new buffers in step 2"
    assert after_second["pool_bytes"] == after_first["pool_bytes"]
    # first in, first out: buffers never used yet are handed out before the ones step 1 gave back
    assert after_second["pool_reuses"] == max(0, 2 * n - after_second["pool_buffers"])
    assert_same_step(first, second, rtol=0, atol=0)
    offload.release_pinned_memory()
    assert offload_stats()["pool_bytes"] == 0


def test_reference_mode_and_no_grad_do_not_offload(kernel_mode):
    layers = make_stack(n_layers=2, seed=37)
    x = torch.randn(2, 3, 24, requires_grad=True)
    kernel_mode("reference")
    expected = run_stack(layers, x)
    assert_same_step(run_stack(layers, x, offloaded_checkpoint), expected, **FP32_TOL)
    kernel_mode("triton")
    with torch.no_grad():
        out = offloaded_checkpoint(layers[0], x)
    torch.testing.assert_close(out, layers[0](x).detach(), **FP32_TOL)
    assert offload_stats()["calls"] == 0


def test_reference_is_torch_checkpoint():
    layers = make_stack(n_layers=2, seed=41)
    x = torch.randn(2, 3, 24, requires_grad=True)
    assert_same_step(
        run_stack(layers, x, offloaded_checkpoint_reference),
        run_stack(layers, x, functools.partial(torch_checkpoint, use_reentrant=False)),
        rtol=0,
        atol=0,
    )


def test_pool_carves_aligned_buffers():
    pool = offload._HostBufferPool()
    size = 1_500_000  # two to a slab of offload.SLAB_BYTES (4 MiB)
    buffers = [pool.take(size, pinned=False) for _ in range(5)]
    assert all(b.numel() == size for b in buffers)
    # aligned within their slab (pinned slabs themselves are page-aligned)
    assert all((b.data_ptr() - b.untyped_storage().data_ptr()) % offload.BUFFER_ALIGN == 0 for b in buffers)
    assert len({b.data_ptr() for b in buffers}) == 5
    stats = pool.stats()
    assert stats["pool_buffers"] == 6 and stats["pool_slabs"] == 3
    for b in buffers:
        pool.give(b, None, pinned=False)
    again = [pool.take(size, pinned=False) for _ in range(stats["pool_buffers"])]  # every buffer, no new slab
    assert {b.data_ptr() for b in buffers} <= {b.data_ptr() for b in again}
    assert pool.stats()["pool_reuses"] == 5 and pool.stats()["pool_slabs"] == 3
    # After clear(), buffers handed out before it are not taken back into the pool.
    pool.clear()
    pool.give(again[0], None, pinned=False)
    assert pool.stats()["pool_bytes"] == 0
    fresh = pool.take(size, pinned=False)
    assert fresh.data_ptr() not in {b.data_ptr() for b in buffers}


def test_pool_serves_shorter_inputs_from_longer_buffers_and_drops_outgrown_slabs():
    pool = offload._HostBufferPool()
    kb = 1000  # sizes in thousands of bytes: four 1 MB buffers to a 4 MiB slab, one of 3 MB
    small = [pool.take(1000 * kb, pinned=False) for _ in range(5)]
    for b in small:
        pool.give(b, None, pinned=False)
    assert pool.stats()["pool_slabs"] == 2
    large = [pool.take(3000 * kb, pinned=False) for _ in range(5)]  # nothing fits: the 1 MB slabs go
    stats = pool.stats()
    assert stats["pool_retired"] == 2 and stats["pool_slabs"] == len(pool._slabs) and all(
        s.numel() >= 3000 * kb for s in pool._slabs)
    assert all(b.numel() == 3000 * kb for b in large)
    for b in large:
        pool.give(b, None, pinned=False)
    slabs = pool.stats()["pool_slabs"]
    medium = [pool.take(2000 * kb, pinned=False) for _ in range(5)]  # served by the 3 MB buffers
    assert all(b.numel() == 2000 * kb for b in medium) and pool.stats()["pool_slabs"] == slabs
    assert {b.data_ptr() for b in medium} <= {b.data_ptr() for b in large}
    # a slab with a buffer still held is not dropped, and its buffers come back to the pool
    held = medium[0]
    for b in medium[1:]:
        pool.give(b, None, pinned=False)
    bigger = pool.take(8000 * kb, pinned=False)
    slab = held._nbtune_whole._nbtune_slab
    assert not slab.retired and any(t is slab.tensor for t in pool._slabs)  # the held one's slab stays
    pool.give(held, None, pinned=False)
    again = pool.take(2000 * kb, pinned=False)
    assert again.numel() == 2000 * kb and bigger.numel() == 8000 * kb


def test_batches_of_varying_length_do_not_grow_the_pool(kernel_mode):
    """Padded batches change length every micro-batch: the pool ends at one step's buffers for the
    longest (what the planner's host-RAM estimate counts), and the gradients are unchanged."""
    from nbtune.planner.host_memory import pool_bytes

    kernel_mode("triton")
    offload.release_pinned_memory()
    n = 4
    layers = make_stack(n_layers=n, seed=59)
    lengths = [10, 13, 7, 22, 16, 22, 5, 19]
    for length in lengths:
        x = torch.randn(2, length, 24, requires_grad=True)
        assert_same_step(run_stack(layers, x, offloaded_checkpoint), run_stack(layers, x), **FP32_TOL)
    gc.collect()
    longest = 2 * max(lengths) * 24 * 4
    assert offload_stats()["pool_bytes"] <= pool_bytes(n, longest)
    assert offload_stats()["pool_retired"] >= 1
    offload.release_pinned_memory()


def test_reserved_tokens_pin_the_pool_once_for_rising_lengths(kernel_mode):
    """With the run's longest micro-batch reserved, lengths that keep rising (packed rows filling
    up, padded rows) are served by the first step's buffers: the pool never retires a slab (each
    retirement is a cudaFreeHost and a cudaHostAlloc on a GPU), holds what the planner counts for
    the reserved length, and the gradients are unchanged."""
    from nbtune.planner.host_memory import pool_bytes

    kernel_mode("triton")
    offload.release_pinned_memory()
    n, lengths = 4, [10, 13, 16, 19, 22]
    layers = make_stack(n_layers=n, seed=61)
    try:
        offload.reserve_tokens(2 * max(lengths))
        before, first = offload_stats(), None
        for length in lengths:
            x = torch.randn(2, length, 24, requires_grad=True)
            assert_same_step(run_stack(layers, x, offloaded_checkpoint), run_stack(layers, x), **FP32_TOL)
            gc.collect()
            first = first or offload_stats()
        after = offload_stats()
        assert after["pool_retired"] == before["pool_retired"]
        assert after["pool_buffers"] == first["pool_buffers"] and after["pool_slabs"] == first["pool_slabs"]
        longest = 2 * max(lengths) * 24 * 4
        assert n * longest <= after["pool_bytes"] <= pool_bytes(n, longest)
        offload.reserve_tokens(None)  # unreserved, the same lengths re-pin at every new longest one
        offload.release_pinned_memory()
        for length in lengths:
            run_stack(layers, torch.randn(2, length, 24, requires_grad=True), offloaded_checkpoint)
        gc.collect()
        assert offload_stats()["pool_retired"] - after["pool_retired"] == len(lengths) - 1
    finally:
        offload.reserve_tokens(None)
        offload.release_pinned_memory()


def test_the_run_reserves_its_longest_micro_batch():
    from nbtune.train.config import build_config
    from nbtune.train.run import offload_reserve

    def cfg(**train):
        return build_config({"model": {"name": "smollm2-135m-instruct", "max_seq_length": 512},
                             "data": {"source": "gsm8k"}, "train": {"batch_size": 3, **train}})

    assert offload_reserve(cfg(), "offload") == 3 * 512
    assert offload_reserve(cfg(method="dpo"), "offload") == 2 * 3 * 512
    assert offload_reserve(cfg(), "plain") is None
    assert offload_reserve(cfg(method="grpo"), "offload") is None


class _CopyEvent:
    """Stands in for a CUDA event: finished or not, and whether the host waited on it."""

    def __init__(self, done: bool):
        self.done, self.waited = done, False

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = True


def test_the_planners_pool_model_is_the_pool():
    """nbtune.planner.host_memory.pool_bytes (the host-RAM estimate's pool term) counts the bytes of
    the slabs the pool allocates, each exactly its buffers (page-locked in place on CUDA, no
    power-of-two rounding)."""
    from nbtune.planner import host_memory

    assert host_memory.POOL_SLAB_BYTES == offload.SLAB_BYTES
    assert host_memory.POOL_BUFFER_ALIGN == offload.BUFFER_ALIGN
    for nbytes, n in [(1000, 5), (3 * 2**20 + 7, 9), (384 * 2**10, 11), (2**20, 4), (5 * 2**20, 3)]:
        pool = offload._HostBufferPool()
        taken = [pool.take(nbytes, pinned=False) for _ in range(n)]
        assert len(taken) == n
        assert host_memory.pool_bytes(n, nbytes) == sum(slab.numel() for slab in pool._slabs)


def test_pinned_slabs_fall_back_to_torchs_pinned_allocator_with_a_warning(monkeypatch):
    """Where host memory cannot be page-locked in place (no CUDA runtime binding, an error from
    cudaHostRegister), slabs come from torch's pinned allocator, and the run is told that host RAM
    may exceed the plan."""
    assert offload._page_locked(4096) is None or torch.cuda.is_available()
    monkeypatch.setattr(offload, "_page_locked", lambda nbytes: None)
    asked = []

    def empty(n, dtype=None, pin_memory=False):
        asked.append(pin_memory)
        return torch.zeros(n, dtype=dtype)

    monkeypatch.setattr(offload.torch, "empty", empty)
    warned = []
    monkeypatch.setattr(offload, "_warn_once", warned.append)
    slab = offload._host_slab(1024, pinned=True)
    assert slab.numel() == 1024 and asked == [True]
    assert warned and "torch's pinned allocator" in warned[0] and "exceed the plan" in warned[0]
    assert offload._host_slab(1024, pinned=False).numel() == 1024 and asked == [True, False] and len(warned) == 1


def test_pool_hands_out_the_buffer_given_back_longest_ago_without_waiting():
    # The backward gives buffers back last layer first; the next forward takes them from its first
    # layer. The oldest one's copy is long finished; the newest one's may still be queued on the GPU.
    pool = offload._HostBufferPool()
    first = pool.take(1000, pinned=False)
    buffers = [first] + [pool.take(1000, pinned=False) for _ in range(pool.stats()["pool_buffers"] - 1)]
    events = [_CopyEvent(done=True) for _ in buffers[:-1]] + [_CopyEvent(done=False)]
    for b, e in zip(buffers, events):
        pool.give(b, e, pinned=False)
    assert pool.take(1000, pinned=False).data_ptr() == buffers[0].data_ptr()
    assert not any(e.waited for e in events)
    rest = [pool.take(1000, pinned=False) for _ in buffers[1:]]
    assert [b.data_ptr() for b in rest] == [b.data_ptr() for b in buffers[1:]]
    assert events[-1].waited and not any(e.waited for e in events[:-1])  # a copy still in flight is waited for before its buffer is reused


def test_falls_back_when_host_memory_cannot_be_had(kernel_mode, monkeypatch):
    kernel_mode("triton")
    layers = make_stack(n_layers=3, seed=53)
    x = torch.randn(2, 4, 24, requires_grad=True)
    expected = run_stack(layers, x)

    def no_memory(*args, **kwargs):
        raise RuntimeError("cudaHostAlloc failed (simulated)")

    monkeypatch.setattr(offload._POOL, "take", no_memory)
    monkeypatch.setattr(offload, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="could not offload"):
        got = run_stack(layers, x, offloaded_checkpoint)
    assert_same_step(got, expected, **FP32_TOL)
    assert offload_stats()["offloaded"] == 0


def test_warns_when_torch_does_not_save_inputs_through_hooks(kernel_mode, monkeypatch):
    """Should a torch release save checkpoint inputs some other way, the call stays correct."""
    kernel_mode("triton")
    layers = make_stack(n_layers=2, seed=59)
    x = torch.randn(2, 4, 24, requires_grad=True)
    expected = run_stack(layers, x)
    monkeypatch.setattr(offload, "_torch_checkpoint",
                        lambda fn, *a, use_reentrant, context_fn=None, determinism_check=None, **k: fn(*a, **k))
    monkeypatch.setattr(offload, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="did not save its inputs"):
        got = run_stack(layers, x, offloaded_checkpoint)
    assert_same_step(got, expected, **FP32_TOL)
    assert offload_stats()["not_seen"] == 2


def test_torch_checkpoint_runs_without_its_recompute_metadata_check(kernel_mode, monkeypatch):
    """torch's checkpoint compares every recomputed tensor's shape, dtype and device with the
    forward's (``determinism_check="default"``): host time per saved tensor and layer, for a
    recompute whose gradients the tests prove exact. nbtune asks for "none" unless told otherwise."""
    kernel_mode("triton")
    seen = []

    def spy(fn, *a, use_reentrant, **k):
        seen.append(k.get("determinism_check"))
        return fn(*a)

    monkeypatch.setattr(offload, "_torch_checkpoint", spy)
    x = torch.randn(2, 4, 6, requires_grad=True)
    offloaded_checkpoint(torch.tanh, x)
    offloaded_checkpoint_reference(torch.tanh, x)
    offloaded_checkpoint(torch.tanh, x, determinism_check="default")
    assert seen == ["none", "none", "default"]


def test_same_tensor_passed_twice(kernel_mode):
    kernel_mode("triton")
    w = torch.randn(6, 6, requires_grad=True)
    x = torch.randn(3, 6, requires_grad=True)

    def f(a, b):
        return torch.tanh(a @ w) * b

    def grads(fn):
        x.grad = w.grad = None
        h = x * 2.0
        fn(f, h, h).pow(2).sum().backward()
        return x.grad.clone(), w.grad.clone()

    for got, want in zip(grads(offloaded_checkpoint), grads(lambda fn, *a: fn(*a))):
        torch.testing.assert_close(got, want, **FP32_TOL)


def test_compile_specs_empty():
    assert offload.compile_specs() == []


# ------------------------------------------------------- CPU: transformers + peft LoRA -------


def tiny_lora_llama(seed=0, device="cpu"):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).to(device)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random B too, so every LoRA matrix gets a nonzero gradient
    )
    return peft.get_peft_model(model, lora)


def lora_step(model, input_ids):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


@pytest.mark.parametrize("mode", ["auto", "triton"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_tiny_llama_lora_matches_no_checkpointing(kernel_mode, mode, use_reentrant):
    kernel_mode(mode)
    model = tiny_lora_llama(seed=3)
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    expected_loss, expected_grads = lora_step(copy.deepcopy(model), input_ids)

    assert enable_offloaded_checkpointing(model, use_reentrant=use_reentrant) is model
    base = model.get_base_model()
    assert base.is_gradient_checkpointing and model.training
    layers = base.model.layers
    for layer in layers:
        assert layer.gradient_checkpointing
        assert layer._gradient_checkpointing_func.func is offloaded_checkpoint
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": use_reentrant}

    calls = []
    real = offload.offloaded_checkpoint_reference if mode == "auto" else offload._torch_checkpoint

    def spy(function, *args, **kwargs):
        # transformers passes the layer's __call__ with its kwargs bound and the hidden states first
        assert isinstance(function, functools.partial) and function.keywords
        assert isinstance(args[0], torch.Tensor) and args[0].shape[-1] == 64
        calls.append(len(args))
        return real(function, *args, **kwargs)

    name = "offloaded_checkpoint_reference" if mode == "auto" else "_torch_checkpoint"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offload, name, spy)
        loss, grads = lora_step(model, input_ids)
    assert len(calls) == len(layers)
    torch.testing.assert_close(loss, expected_loss, **FP32_TOL)
    assert grads.keys() == expected_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], expected_grads[n], **FP32_TOL, msg=lambda m: f"{n}: {m}")
    stats = offload_stats()
    assert stats["offloaded"] == (len(layers) if mode == "triton" else 0)

    model.gradient_checkpointing_disable()
    assert not base.is_gradient_checkpointing


def test_enable_every_n_layers(kernel_mode):
    kernel_mode("triton")
    model = tiny_lora_llama(seed=6)
    input_ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(7))
    expected_loss, expected_grads = lora_step(copy.deepcopy(model), input_ids)
    enable_offloaded_checkpointing(model, every_n_layers=2)
    layers = model.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    loss, grads = lora_step(model, input_ids)
    torch.testing.assert_close(loss, expected_loss, **FP32_TOL)
    for n in grads:
        torch.testing.assert_close(grads[n], expected_grads[n], **FP32_TOL)
    assert offload_stats()["offloaded"] == 1


@pytest.mark.parametrize("n", [0, 1, 2])
def test_enable_offloads_the_first_n_layers_and_checkpoints_the_rest_plainly(kernel_mode, n):
    """Partial offload: the first n decoder layers offloaded, the others plain; gradients unchanged."""
    kernel_mode("triton")
    model = tiny_lora_llama(seed=8)
    input_ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(9))
    expected_loss, expected_grads = lora_step(copy.deepcopy(model), input_ids)
    enable_offloaded_checkpointing(model, offload_layers=n)
    layers = offload.checkpointed_layers(model)
    assert layers == list(model.get_base_model().model.layers)
    assert [layer._gradient_checkpointing_func.func for layer in layers] == (
        [offloaded_checkpoint] * n + [offloaded_checkpoint_reference] * (len(layers) - n))
    loss, grads = lora_step(model, input_ids)
    torch.testing.assert_close(loss, expected_loss, **FP32_TOL)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], **FP32_TOL)
    assert offload_stats()["offloaded"] == n


def test_enable_rejects_a_bad_layer_count():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="offload_layers must be a whole number"):
            enable_offloaded_checkpointing(tiny_lora_llama(), offload_layers=bad)


def test_enable_rejects_models_without_checkpointing_support():
    with pytest.raises(ValueError):
        enable_offloaded_checkpointing(nn.Linear(2, 2))


# --------------------------------------------------------------------------- GPU -------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gpu_stack_matches(monkeypatch, dtype, use_reentrant):
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    gc.collect()
    n = 6
    layers = make_stack(n_layers=n, hidden=256, inner=512, seed=43, device="cuda", dtype=dtype)
    x = torch.randn(4, 300, 256, device="cuda", dtype=dtype, requires_grad=True)
    plain = run_stack(layers, x, functools.partial(torch_checkpoint, use_reentrant=use_reentrant))
    none = run_stack(layers, x)
    reset_offload_stats()
    got = run_stack(layers, x, functools.partial(offloaded_checkpoint, use_reentrant=use_reentrant))
    torch.cuda.synchronize()
    # Same kernels on the same bits: equal to torch's checkpoint; to no checkpointing up to dtype.
    exact = FP32_TOL if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    assert_same_step(got, plain, **exact)
    tol = FP32_TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_same_step(got, none, **tol)
    stats = offload_stats()
    assert stats["offloaded"] == n and stats["not_seen"] == 0
    assert stats["from_device"] == offload.DEVICE_WINDOW
    assert stats["prefetch_used"] == n - offload.DEVICE_WINDOW
    assert stats["fetched"] == 0


@gpu
def test_gpu_dropout_rng_restored(monkeypatch):
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    layers = make_stack(n_layers=4, hidden=128, inner=256, dropout=0.25, seed=47, device="cuda")
    x = torch.randn(2, 200, 128, device="cuda", requires_grad=True)
    results = {}
    for name, fn in [
        ("none", None),
        ("torch", functools.partial(torch_checkpoint, use_reentrant=False)),
        ("offload", offloaded_checkpoint),
    ]:
        torch.manual_seed(2024)  # seeds the CUDA generator too
        results[name] = run_stack(layers, x, fn)
    assert_same_step(results["offload"], results["torch"], rtol=0, atol=0)
    assert_same_step(results["offload"], results["none"], **FP32_TOL)
    assert offload_stats()["offloaded"] == 4


@gpu
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gpu_tiny_llama_lora(monkeypatch, use_reentrant):
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    model = tiny_lora_llama(seed=5, device="cuda")
    input_ids = torch.randint(0, 128, (2, 32), device="cuda")
    expected_loss, expected_grads = lora_step(copy.deepcopy(model), input_ids)
    enable_offloaded_checkpointing(model, use_reentrant=use_reentrant)
    reset_offload_stats()
    loss, grads = lora_step(model, input_ids)
    torch.testing.assert_close(loss, expected_loss, **FP32_TOL)
    for n in grads:
        torch.testing.assert_close(grads[n], expected_grads[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    assert offload_stats()["offloaded"] == 2


def _peak_step(layers, x, fn):
    """(peak bytes allocated during forward+backward, bytes held right after the forward),
    both above what was allocated before the step."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    h = x * 1.0
    for layer in layers:
        h = fn(layer, h)
    loss = h.float().pow(2).mean()
    torch.cuda.synchronize()
    after_forward = torch.cuda.memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del h, loss
    return peak, after_forward


@gpu
def test_gpu_peak_memory_below_torch_checkpoint_and_pinned_reuse():
    """16 layers, hidden states of 32 MiB each (16384 tokens x 1024, fp16): torch's checkpoint
    keeps all 16 inputs on the GPU between forward and backward, the offload keeps
    DEVICE_WINDOW of them (plus one prefetched in backward)."""
    n, tokens, hidden = 16, 16384, 1024
    torch.manual_seed(0)
    block = LoraBlock(hidden, 4 * hidden, rank=16).to("cuda", torch.float16)
    layers = nn.ModuleList([block] * n)  # one set of weights, called 16 times: inputs dominate
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.float16, requires_grad=True)
    state_bytes = tokens * hidden * 2

    def grads():
        out = (x.grad.clone(), block.lora_a.grad.clone(), block.lora_b.grad.clone())
        x.grad = block.lora_a.grad = block.lora_b.grad = None
        return out

    torch_peak, torch_held = _peak_step(layers, x, functools.partial(torch_checkpoint, use_reentrant=False))
    torch_grads = grads()
    offload.release_pinned_memory()
    reset_offload_stats()
    peaks, pool_after = [], []
    for _ in range(2):  # two steps: the second must reuse the first one's pinned buffers
        peaks.append(_peak_step(layers, x, offloaded_checkpoint))
        offload_grads = grads()
        gc.collect()
        pool_after.append(offload_stats())
    first_step_pool, stats = pool_after
    mib = 2**20
    report = (
        f"torch peak {torch_peak / mib:.0f} MiB, held after forward {torch_held / mib:.0f} MiB; "
        f"offload (peak, held) per step {[(p // mib, h // mib) for p, h in peaks]} MiB; {stats}"
    )
    print(report)
    for peak, held in peaks:
        assert held <= torch_held - (n - offload.DEVICE_WINDOW - 1) * state_bytes, report
        assert peak <= torch_peak - (n - offload.DEVICE_WINDOW - 3) * state_bytes, report
    for a, b in zip(offload_grads, torch_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert stats["offloaded"] == 2 * n and stats["not_seen"] == 0
    assert first_step_pool["pool_reuses"] == 0
    assert stats["pool_slabs"] == first_step_pool["pool_slabs"]
    assert stats["pool_bytes"] == first_step_pool["pool_bytes"] >= n * state_bytes
    assert stats["pool_reuses"] == max(0, 2 * n - stats["pool_buffers"])  # first in, first out
    assert all(slab.is_pinned() for slab in offload._POOL._slabs)


# ----------------------------------------------------------------------------- checkpoint phase
class _PhaseRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen = []

    def forward(self, x):
        self.seen.append(offload.checkpoint_phase())
        return self.lin(x).tanh()


@pytest.mark.parametrize("checkpoint", [offloaded_checkpoint, offload.offloaded_checkpoint_reference])
def test_checkpoint_phase_names_forward_recompute_and_owner(kernel_mode, checkpoint):
    """Inside the first run "forward", inside the backward's rerun "recompute", with the module whose
    bound method was checkpointed (through functools.partial, as transformers calls it); None outside
    and with the reentrant implementation. A caller's own context_fn still runs."""
    kernel_mode("triton")
    layer = _PhaseRecorder()
    x = torch.randn(3, 4, requires_grad=True)
    entered = []

    class Marker:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            entered.append((self.name, offload.checkpoint_phase().name))

        def __exit__(self, *exc):
            return False

    out = checkpoint(functools.partial(layer.__call__), x, context_fn=lambda: (Marker("f"), Marker("r")))
    assert offload.checkpoint_phase() is None
    out.sum().backward()
    assert [(p.name, p.owner) for p in layer.seen] == [("forward", layer), ("recompute", layer)]
    assert entered == [("f", "forward"), ("r", "recompute")]
    assert offload.checkpoint_phase() is None

    layer.seen.clear()
    checkpoint(layer, x, use_reentrant=True).sum().backward()
    assert layer.seen == [None, None]


@pytest.mark.parametrize("wrap", ["bound_call", "forward_and_layer", "nested_partial", "bound_forward"])
def test_checkpoint_phase_finds_the_layer_however_transformers_wraps_it(kernel_mode, wrap):
    """Transformers <= 5.22 checkpoints ``partial(super().__call__, **kwargs)`` (a bound method);
    5.23 on ``partial(forward, layer, **kwargs)`` (the class's function, the layer as its first
    argument). Either way the phase's owner is the layer: the checkpointed-tail LoRA MLP is
    chosen by it, and a None owner would silently switch that saving off."""
    kernel_mode("triton")
    layer = _PhaseRecorder()
    x = torch.randn(3, 4, requires_grad=True)
    function = {
        "bound_call": functools.partial(layer.__call__),
        "forward_and_layer": functools.partial(_PhaseRecorder.forward, layer),
        "nested_partial": functools.partial(functools.partial(_PhaseRecorder.forward), layer),
        "bound_forward": layer.forward,
    }[wrap]
    offloaded_checkpoint(function, x).sum().backward()
    assert [(p.name, p.owner) for p in layer.seen] == [("forward", layer), ("recompute", layer)]


def test_checkpoint_phase_owner_is_none_for_a_plain_function(kernel_mode):
    """A function that is no module's method (its first argument a tensor) has no owner."""
    kernel_mode("triton")
    seen = []

    def run(t):
        seen.append(offload.checkpoint_phase())
        return t.tanh()

    x = torch.randn(3, 4, requires_grad=True)
    offloaded_checkpoint(functools.partial(run), x).sum().backward()
    assert [(p.name, p.owner) for p in seen] == [("forward", None), ("recompute", None)]


@gpu
def test_gpu_pool_slabs_are_page_locked_at_their_exact_size(monkeypatch):
    """Pinned slabs are host memory of exactly their buffers' bytes, page-locked in place: 5 MiB +
    512 bytes would be 8 MiB from torch's pinned allocator. Copies from and to them run
    asynchronously and carry the bits; freeing the pool unlocks each of them as it is freed."""
    unlocked, real = [], offload._unregister
    monkeypatch.setattr(offload, "_unregister", lambda ptr: (unlocked.append(ptr), real(ptr)))
    nbytes = 5 * 2**20 + 512
    pool = offload._HostBufferPool()
    buffers = [pool.take(nbytes, pinned=True) for _ in range(3)]
    assert pool.stats()["pool_bytes"] == 3 * nbytes and all(s.numel() == nbytes for s in pool._slabs)
    assert all(b.is_pinned() for b in buffers)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        buffers[0].copy_(src, non_blocking=True)
        back = buffers[0].to("cuda", non_blocking=True)
    side.synchronize()
    assert torch.equal(back, src)
    ptrs = [s.data_ptr() for s in pool._slabs]
    for b in buffers:
        pool.give(b, None, pinned=True)
    del buffers, b
    pool.clear()
    gc.collect()
    assert pool.stats()["pool_bytes"] == 0 and len(ptrs) == 3 and sorted(unlocked) == sorted(ptrs)
