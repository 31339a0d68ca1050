"""Where does one nbtune training step spend its GPU time? (the peers' loop, under torch.profiler)

    python benchmarks/profile_step.py llama3-8b:2:2048:bfloat16 [--variants offload,plain] [--top 30]

For each checkpointing variant: median step time over a few steps, GPU busy time vs wall time
(a gap means the GPU waits on Python or on copies), and the top CUDA kernels by total time,
grouped into families (GEMM, NF4 dequant, attention, norm, rope, glu, cross-entropy, copies).
"""
import argparse
import gc
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "peers"))
sys.path.insert(0, HERE)
from bench_common import LORA_TARGETS, SHAPES, build_checkpoint, ensure_tokenizer  # noqa: E402
from relpaths import relativize  # noqa: E402

import torch  # noqa: E402

FAMILIES = (
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere", "cublas", "matmul")),
    ("nf4_dequant", ("nf4", "dequant")),
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("rms_norm", ("rms",)),
    ("rope", ("rope",)),
    ("glu", ("glu", "swiglu", "geglu")),
    ("cross_entropy", ("cross_entropy", "_ce_", "logsumexp")),
    ("copy", ("memcpy", "copy", "memset")),
    ("optimizer", ("optimizer", "adam")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", help="shape:batch:seq:dtype")
    ap.add_argument("--variants", default="offload,plain")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--host", action="store_true",
                    help="also report host-side time: issue time of forward/backward, CUDA runtime calls "
                         "that block the host (synchronize, blocking copies, cudaFree), top CPU ops, and a "
                         "cProfile of one step's Python")
    a = ap.parse_args()
    shape, batch, seq, dtype = a.spec.split(":")
    batch, seq, dtype = int(batch), int(seq), getattr(torch, dtype)
    path = os.path.join(os.environ.get("CKPT_ROOT", "/tmp/ckpt"), shape)
    build_checkpoint(shape, path)
    ensure_tokenizer(path, SHAPES[shape]["vocab_size"])
    import bitsandbytes as bnb

    import nbtune

    for variant in a.variants.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model, _ = nbtune.load_model(path, max_seq_length=seq, load_in_4bit=True, dtype=dtype)
        model = nbtune.add_lora(model, r=16, alpha=16, dropout=0.0, targets=LORA_TARGETS, gradient_checkpointing=variant)
        model.train()
        opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        g = torch.Generator(device="cuda").manual_seed(1)
        vocab = model.config.vocab_size

        def step():
            ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=g)
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        kernels = sorted(((e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
                          if getattr(e, "self_device_time_total", 0) > 0), key=lambda r: -r[1])
        busy = sum(ms for _, ms, _ in kernels)
        fams = {}
        for name, ms, _ in kernels:
            fams[family(name)] = fams.get(family(name), 0.0) + ms
        print(f"\n=== {a.spec} checkpointing={variant}: median step {med * 1e3:.0f} ms "
              f"({batch * seq / med:,.0f} tok/s); profiled step wall {wall * 1e3:.0f} ms, GPU busy {busy:.0f} ms "
              f"({100 * busy / (wall * 1e3):.0f}%); peak reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
        print("  by family: " + ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(fams.items(), key=lambda kv: -kv[1])))
        for name, ms, count in kernels[: a.top]:
            print(f"  {ms:8.1f} ms {count:6d}x  [{family(name)}] {name[:110]}")
        if a.host:
            report_host(prof, step, model, opt, batch, seq, vocab, g, a.top)
        del model, opt, prof
        gc.collect()
        torch.cuda.empty_cache()


BLOCKING_CALLS = ("Synchronize", "cudaMemcpy ", "cudaMemcpy\t", "cudaFree", "cudaMalloc", "cudaHostAlloc",
                  "cudaMemcpy2D ", "cudaStreamQuery", "cudaEventQuery")


def report_gaps(prof, top):
    """Real GPU busy time per stream (union of kernel intervals, no double counting) and the
    longest idle gaps of the busiest stream with the kernels on either side."""
    kernels = [e for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    by_stream = {}
    for e in kernels:
        by_stream.setdefault(getattr(e, "device_resource_id", 0), []).append(e)
    main_stream, main_busy = None, -1.0
    for stream, evs in sorted(by_stream.items()):
        evs.sort(key=lambda e: e.time_range.start)
        busy, end = 0.0, None
        for e in evs:
            start = e.time_range.start if end is None else max(e.time_range.start, end)
            if e.time_range.end > start:
                busy += e.time_range.end - start
            end = e.time_range.end if end is None else max(end, e.time_range.end)
        span = evs[-1].time_range.end - evs[0].time_range.start
        print(f"  stream {stream}: {len(evs)} kernels/copies, busy {busy / 1e3:.1f} ms of a {span / 1e3:.1f} ms span "
              f"({100 * busy / max(span, 1):.0f}%)")
        if busy > main_busy:
            main_stream, main_busy = stream, busy
    evs = by_stream.get(main_stream, [])
    gaps, end, last = [], None, None
    for e in evs:
        if end is not None and e.time_range.start > end:
            gaps.append((e.time_range.start - end, last.name, e.name))
        if end is None or e.time_range.end > end:
            end, last = e.time_range.end, e
    total = sum(g for g, _, _ in gaps)
    small = sum(g for g, _, _ in gaps if g < 20)
    print(f"  stream {main_stream} idle: {total / 1e3:.1f} ms in {len(gaps)} gaps ({small / 1e3:.1f} ms in gaps < 20 us)")
    agg = {}
    for g, before, after in gaps:
        k = (before[:50], after[:50])
        n, t = agg.get(k, (0, 0.0))
        agg[k] = (n + 1, t + g)
    for (before, after), (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {t / 1e3:7.2f} ms {n:5d}x  after {before}  ->  before {after}")


def report_host(prof, step, model, opt, batch, seq, vocab, g, top):
    """Host side of one step: how long Python takes to issue the forward and the backward (no
    sync), which runtime calls can block it, the top CPU ops, and where Python spends its time."""
    import cProfile

    report_gaps(prof, top)
    events = prof.key_averages()
    runtime = sorted(((e.key, e.count, e.cpu_time_total / 1e3) for e in events if e.key.startswith("cuda")),
                     key=lambda r: -r[2])
    print("  CUDA runtime calls (host ms):")
    for name, count, ms in runtime[:15]:
        flag = "  <- can block" if any(b.strip() in name for b in BLOCKING_CALLS) else ""
        print(f"    {ms:8.1f} ms {count:6d}x  {name}{flag}")
    cpu_ops = sorted(((e.key, e.count, e.self_cpu_time_total / 1e3) for e in events), key=lambda r: -r[2])
    print("  top ops by self CPU time:")
    for name, count, ms in cpu_ops[:top]:
        print(f"    {ms:8.1f} ms {count:6d}x  {name[:100]}")
    # issue times: the host returns from forward/backward long before the GPU finishes, unless it blocks
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    out.loss.backward()
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    t5 = time.perf_counter()
    print(f"  forward: host issue {1e3 * (t1 - t0):.0f} ms, done {1e3 * (t2 - t0):.0f} ms; "
          f"backward: host issue {1e3 * (t3 - t2):.0f} ms, done {1e3 * (t4 - t2):.0f} ms; "
          f"optimizer {1e3 * (t5 - t4):.0f} ms")
    prof_py = cProfile.Profile()
    torch.cuda.synchronize()
    prof_py.enable()
    step()
    torch.cuda.synchronize()
    prof_py.disable()
    print("  cProfile of one step (tottime):")
    print(cprofile_text(prof_py, top))


def cprofile_text(prof_py, top: int) -> str:
    """The ``top`` functions of a cProfile by own time, indented, with repo-relative paths (an
    installed package's relative to its install folder: relpaths.py)."""
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(prof_py, stream=buf).sort_stats("tottime").print_stats(top)
    return relativize("\n".join("    " + line for line in buf.getvalue().splitlines()[6:]))


if __name__ == "__main__":
    main()
