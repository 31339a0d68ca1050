"""Time every nbtune kernel against torch eager and torch.compile at llama3-8b sizes.

    python benchmarks/kernel_bench.py [--dtype bf16,fp16] [--only rms_norm,rope] [--out benchmarks/results]

For each case: median time (triton.testing.do_bench), achieved GB/s against the GPU's measured
copy bandwidth (a large device-to-device copy, bytes read + written), TFLOP/s where the case
counts FLOPs, and the peak memory the call allocates beyond its inputs. Writes
``kernels-<gpu>.json`` and ``kernels-<gpu>.md`` under --out and prints the table.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from kernel_cases import CASE_MODULES  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure_copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import triton.testing

    src = torch.empty(n_bytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def time_impl(fn, args) -> tuple[float, float, float | None]:
    """(median ms with launches, peak MiB allocated by one call beyond what was live before it,
    median ms of the GPU work alone from a CUDA-graph replay, or None where capture fails).

    The first number includes Python and launch overhead (what an eager training step pays when
    the GPU is not busy enough to hide it); the graph number is the kernels' own time, the one to
    hold against the copy bandwidth.
    """
    import triton.testing

    fn(*args)  # warm-up / compile
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median")
    try:
        graph_ms = triton.testing.do_bench_cudagraph(lambda: fn(*args), rep=100, return_mode="median")
    except Exception:  # host syncs, CPU-side libraries (bitsandbytes) or autograd quirks: no graph
        torch.cuda.synchronize()
        graph_ms = None
    return ms, peak, graph_ms


def run(dtypes, only, out_dir):
    props = torch.cuda.get_device_properties(0)
    copy_gbs = measure_copy_bandwidth()
    print(f"# {props.name}: measured copy bandwidth {copy_gbs:,.0f} GB/s", flush=True)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for mod_name in CASE_MODULES:
            if only and mod_name not in only:
                continue
            mod = importlib.import_module(f"kernel_cases.{mod_name}")
            for case in mod.cases(dtype):
                impls = dict(case.impls)
                if case.compile_eager and "eager" in impls:
                    impls["compile"] = torch.compile(impls["eager"], dynamic=False)
                args = case.make_inputs()
                for impl_name, fn in impls.items():
                    row = dict(kernel=case.kernel, case=case.name, dtype=dname, impl=impl_name)
                    try:
                        ms, peak, graph_ms = time_impl(fn, args)
                        row.update(ms=round(ms, 4), peak_extra_mib=round(peak, 1))
                        if graph_ms is not None:
                            row.update(graph_ms=round(graph_ms, 4))
                        gpu_ms = graph_ms if graph_ms is not None else ms
                        if case.bytes_moved:
                            gbs = case.bytes_moved / (gpu_ms * 1e-3) / 1e9
                            row.update(gb_s=round(gbs, 1), pct_copy_bw=round(100 * gbs / copy_gbs, 1))
                        if case.flops:
                            row.update(tflop_s=round(case.flops / (gpu_ms * 1e-3) / 1e12, 1))
                    except Exception as e:  # one failing impl must not hide the others
                        row.update(error=f"{type(e).__name__}: {str(e)[:160]}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del args
                gc.collect()
                torch.cuda.empty_cache()
    meta = dict(
        date=time.strftime("%Y-%m-%d"), gpu=props.name, copy_gb_s=round(copy_gbs),
        torch=torch.__version__, triton=importlib.import_module("triton").__version__,
        python=platform.python_version(),
    )
    os.makedirs(out_dir, exist_ok=True)
    tag = props.name.replace(" ", "-").lower()
    with open(os.path.join(out_dir, f"kernels-{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    table = markdown_table(meta, rows)
    with open(os.path.join(out_dir, f"kernels-{tag}.md"), "w") as f:
        f.write(table)
    print(table)


def markdown_table(meta, rows) -> str:
    lines = [
        f"# nbtune kernels on {meta['gpu']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}; measured copy bandwidth {meta['copy_gb_s']:,} GB/s "
        "(bytes read + written). ms = median with Python/launch overhead (do_bench); GPU ms = median "
        "of a CUDA-graph replay (the kernels alone; blank where the call cannot be captured); GB/s, "
        "% copy BW and TFLOP/s use GPU ms where there is one. Peak extra = memory allocated by the "
        "call beyond its inputs; vs eager compares ms.",
        "",
        "| kernel | case | dtype | impl | ms | GPU ms | GB/s | % copy BW | TFLOP/s | peak extra MiB | vs eager |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    eager = {(r["kernel"], r["case"], r["dtype"]): r.get("ms") for r in rows if r["impl"] == "eager"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['impl']} | error: {r['error']} ||||||")
            continue
        base = eager.get((r["kernel"], r["case"], r["dtype"]))
        speedup = f"{base / r['ms']:.2f}x" if base else ""
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['impl']} | {r['ms']:.3f} | {r.get('graph_ms', '')} | "
            f"{r.get('gb_s', '')} | "
            f"{r.get('pct_copy_bw', '')} | {r.get('tflop_s', '')} | {r['peak_extra_mib']} | {speedup} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16,fp16")
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_bench.py needs a CUDA GPU")
    run(a.dtype.split(","), set(filter(None, a.only.split(","))), a.out)


if __name__ == "__main__":
    main()
