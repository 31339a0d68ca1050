"""benchmarks/tune_rms_norm_bwd.py without a GPU: its sweep includes the launch shape nbtune/kernels/rms_norm.py
ships, and every setting it sweeps is one the kernel accepts (the gradients under the Triton
interpreter match fp64 for each)."""
import importlib
import os

import pytest
import torch
from bench_scripts import BENCH, load_script

M = importlib.import_module("nbtune.kernels.rms_norm")


@pytest.fixture(scope="module")
def tune():
    return load_script("tune_rms_norm_bwd", os.path.join(BENCH, "tune_rms_norm_bwd.py"))


def test_the_sweep_covers_the_shipped_setting(tune):
    shipped = (M.BWD_PROGRAMS_PER_SM, M.BWD_DW_ROWS, M.BWD_DW_WARPS, M.BWD_DW_STAGES)
    assert shipped in tune.settings()
    assert len(set(tune.settings())) == len(tune.settings())


def test_every_swept_setting_gives_the_same_gradients(tune, kernel_mode, monkeypatch):
    kernel_mode("triton")
    monkeypatch.setattr(M, "TILE_ELEMENTS", 64)  # one row per iteration by default, as at hidden 4096
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 100, generator=g)
    w = 1.0 + 0.1 * torch.randn(100, generator=g)
    dy = torch.randn(13, 100, generator=g)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    want = torch.autograd.grad(M.rms_norm_reference(xr, wr, 1e-5), (xr, wr), dy.double())
    for programs, rows, warps, stages in sorted({(1, r, 8, s) for _, r, _, s in tune.settings()}):
        monkeypatch.setattr(M, "BWD_PROGRAMS_PER_SM", programs)
        monkeypatch.setattr(M, "BWD_DW_ROWS", rows)
        monkeypatch.setattr(M, "BWD_DW_WARPS", warps)
        monkeypatch.setattr(M, "BWD_DW_STAGES", stages)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        got = torch.autograd.grad(M.rms_norm(xg, wg, 1e-5), (xg, wg), dy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
