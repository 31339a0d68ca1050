"""Tests for the offload path's opt-in timing (nbtune.kernels.offload: set_offload_timing,
offload_timing): what it counts on the machinery forced onto CPU tensors, that it is silent when
off, that GPU spans the GPU has not reached are carried to a later call, and (marker gpu) real
CUDA timing events around the copies and the compute stream's waits."""
from __future__ import annotations

import gc

import pytest
import torch

from nbtune.kernels import offload
from nbtune.kernels.offload import offload_timing, offloaded_checkpoint, set_offload_timing

from test_offload import make_stack, run_stack


@pytest.fixture
def timing():
    before = offload.offload_timing_enabled()
    set_offload_timing(True)
    offload_timing()  # drop what earlier tests left
    yield
    set_offload_timing(before)
    offload_timing()


def test_counts_every_copy_and_its_bytes_on_the_cpu_machinery(kernel_mode, timing):
    kernel_mode("triton")
    gc.collect()
    n, shape = 6, (2, 5, 24)
    run_stack(make_stack(n_layers=n, seed=41), torch.randn(*shape, requires_grad=True), offloaded_checkpoint)
    t = offload_timing()
    # every layer's input goes out; the last DEVICE_WINDOW ones are served from the device in the backward
    assert t["copy_out_n"] == n
    assert t["copy_in_n"] == n - offload.DEVICE_WINDOW
    assert t["copy_out_ms"] > 0 and t["copy_out_gbps"] > 0 and t["copy_in_gbps"] > 0
    assert t["wait_forward_n"] == t["wait_backward_n"] == t["host_wait_n"] == 0  # no streams on a CPU
    assert t["pending"] == 0
    again = offload_timing()  # totals are since the previous call
    assert again["copy_out_n"] == again["copy_in_n"] == 0 and again["copy_out_gbps"] is None


def test_off_counts_nothing(kernel_mode):
    kernel_mode("triton")
    set_offload_timing(False)
    offload_timing()
    run_stack(make_stack(n_layers=3, seed=43), torch.randn(2, 5, 24, requires_grad=True), offloaded_checkpoint)
    assert all(v in (0, None) for v in offload_timing().values())


class _Event:
    """A stand-in for a CUDA timing event: done or not, at a time in ms."""

    def __init__(self, ms: float, done: bool = True):
        self.ms, self.done = ms, done

    def query(self):
        return self.done

    def elapsed_time(self, end):
        return end.ms - self.ms


def test_spans_not_reached_yet_are_carried_to_the_next_call():
    timer = offload._Timer()
    late_end = _Event(9.0, done=False)
    timer._pending.extend([("wait_backward", _Event(1.0), _Event(3.5), 0),
                           ("copy_in", _Event(2.0), late_end, 4_000_000),
                           ("copy_out", _Event(0.0), _Event(1.0), 1_000_000)])  # behind a pending one: waits its turn
    first = timer.collect()
    assert first["wait_backward_ms"] == 2.5 and first["wait_backward_n"] == 1
    assert first["copy_in_n"] == first["copy_out_n"] == 0 and first["pending"] == 2
    late_end.done = True
    second = timer.collect()
    assert second["copy_in_ms"] == 7.0 and second["copy_in_gbps"] == round(4_000_000 / 7.0 / 1e6, 2)
    assert second["copy_out_ms"] == 1.0 and second["wait_backward_n"] == 0 and second["pending"] == 0


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(offload.TIMING_ENV, "1")
    assert offload._Timer().enabled
    monkeypatch.setenv(offload.TIMING_ENV, "off")
    assert not offload._Timer().enabled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_timing_events_around_copies_and_waits(monkeypatch, timing):
    monkeypatch.setenv("NBTUNE_KERNELS", "auto")
    n = 8
    layers = make_stack(n_layers=n, hidden=2048, inner=4096, seed=47, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 1024, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    run_stack(layers, x, offloaded_checkpoint)
    torch.cuda.synchronize()
    t = offload_timing()
    assert t["copy_out_n"] == n and t["copy_in_n"] == n - offload.DEVICE_WINDOW and t["pending"] == 0
    # 16 MiB per copy over PCIe: well above 1 GB/s, below any link's peak
    assert 1 < t["copy_out_gbps"] < 1000 and 1 < t["copy_in_gbps"] < 1000
    # every input's device tensor is freed once after a wait on its copy-out (n - DEVICE_WINDOW of
    # them as they leave the window in the forward, the window's own when the backward uses them),
    # and every input brought back from the host is waited for once
    assert t["wait_forward_n"] == n
    assert t["wait_backward_n"] == n - offload.DEVICE_WINDOW
    assert t["wait_forward_ms"] >= 0 and t["wait_backward_ms"] >= 0
