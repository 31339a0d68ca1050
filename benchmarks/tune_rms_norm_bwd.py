"""Sweep the launch shape of RMSNorm's backward with a trainable weight (dx and dw) on the GPU.

    python benchmarks/tune_rms_norm_bwd.py [--tokens 4096] [--hidden 4096] [--dtype bf16] [--out DIR]

The dw path runs persistent programs that each accumulate an fp32 partial row of dw
(nbtune/kernels/rms_norm.py): how many per SM (BWD_PROGRAMS_PER_SM), how many rows each takes per loop
iteration (BWD_DW_ROWS), with how many warps (BWD_DW_WARPS) and whether Triton pipelines the loop
(BWD_DW_STAGES) decide how many loads are in flight.
For each setting: the forward+backward's GPU time (CUDA-graph replay, as benchmarks/kernel_bench.py
times the "fwd+bwd trainable w" case), its share of the measured copy bandwidth for the same bytes,
and dx/dw's largest error against the plain-torch reference in fp32 (every setting must give the
same gradients within rounding). Prints a table, best first, and writes tune-rms-norm-bwd.json.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _kernel_bench():
    """benchmarks/kernel_bench.py, by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("nbtune_kernel_bench", os.path.join(HERE, "kernel_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_BENCH = _kernel_bench()
DTYPES, measure_copy_bandwidth = _BENCH.DTYPES, _BENCH.measure_copy_bandwidth


def settings(programs=(1, 2), rows=(1, 2, 4), warps=(8,), stages=(1, 2, 3)):
    """(programs per SM, rows per iteration, warps, pipeline stages) to time. (Earlier sweeps on the
    H200 also had 4 programs per SM, 8 and 16 rows, 4, 16 and 32 warps: never faster than 1 program
    with 4 rows and 8 warps; 16 warps within 1%.)"""
    return list(itertools.product(programs, rows, warps, stages))


def run(tokens: int, hidden: int, dtype: torch.dtype, grid=None) -> dict:
    import triton.testing

    mod = importlib.import_module("nbtune.kernels.rms_norm")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype, generator=g).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(hidden, device="cuda", dtype=dtype, generator=g)).requires_grad_()
    dy = torch.randn(tokens, hidden, device="cuda", dtype=dtype, generator=g)
    ref = torch.autograd.grad(mod.rms_norm_reference(x.float(), w.float(), 1e-5), (x, w), dy.float())
    elt = x.element_size()
    moved = 5 * tokens * hidden * elt + 2 * hidden * elt  # as kernel_cases/rms_norm.py counts it
    copy_gbs = measure_copy_bandwidth()

    def step():
        return torch.autograd.grad(mod.rms_norm(x, w, 1e-5), (x, w), dy)

    saved = (mod.BWD_PROGRAMS_PER_SM, mod.BWD_DW_ROWS, mod.BWD_DW_WARPS, mod.BWD_DW_STAGES)
    rows = []
    try:
        for programs, block_rows, warps, stages in grid or settings():
            mod.BWD_PROGRAMS_PER_SM, mod.BWD_DW_ROWS, mod.BWD_DW_WARPS, mod.BWD_DW_STAGES = (programs, block_rows,
                                                                                           warps, stages)
            dx, dw = step()
            err = [float(((a.float() - r).abs().max() / r.abs().max()).item()) for a, r in ((dx, ref[0]), (dw, ref[1]))]
            ms = triton.testing.do_bench_cudagraph(step, rep=100, return_mode="median")
            gbs = moved / (ms * 1e-3) / 1e9
            rows.append(dict(programs_per_sm=programs, rows=block_rows, warps=warps, stages=stages, gpu_ms=round(ms, 4),
                             pct_copy_bw=round(100 * gbs / copy_gbs, 1), dx_rel_err=err[0], dw_rel_err=err[1]))
    finally:
        mod.BWD_PROGRAMS_PER_SM, mod.BWD_DW_ROWS, mod.BWD_DW_WARPS, mod.BWD_DW_STAGES = saved
    rows.sort(key=lambda r: r["gpu_ms"])
    return dict(gpu=torch.cuda.get_device_name(0), tokens=tokens, hidden=hidden, dtype=str(dtype).split(".")[-1],
                copy_gb_s=round(copy_gbs), current=dict(zip(("programs_per_sm", "rows", "warps", "stages"), saved)), rows=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    args = ap.parse_args(argv)
    result = run(args.tokens, args.hidden, DTYPES[args.dtype])
    print(f"# {result['gpu']} {args.tokens}x{args.hidden} {args.dtype}: copy {result['copy_gb_s']:,} GB/s; "
          f"module setting {result['current']}")
    print("| programs/SM | rows | warps | stages | GPU ms | % copy BW | dx err | dw err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['programs_per_sm']} | {r['rows']} | {r['warps']} | {r['stages']} | {r['gpu_ms']} | {r['pct_copy_bw']} | "
              f"{r['dx_rel_err']:.1e} | {r['dw_rel_err']:.1e} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune-rms-norm-bwd.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
