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
        del model, opt, prof
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
