"""Packed-row attention, forward + backward, by backend: how much a packed row costs against the
same tokens in unpacked rows, for the attention shapes of the patched families.

    python benchmarks/packed_attention.py [--out DIR] [--iters N]

Backends (``NBTUNE_PACKED_ATTENTION``): ``pieces`` (one SDPA per document), ``varlen``
(nbtune.kernels.varlen_attention, one launch), ``flex`` (FlexAttention with a document mask);
``unpacked`` is one causal SDPA per row of the same length, the speed packed rows should reach.
Layouts: ``long`` (documents of 1,024-2,048 tokens, as long plain-text rows pack) and ``chat``
(~200-token documents, ~10 per 2,048-token row, as GSM8K chat rows pack). Each case reports the
median milliseconds of forward + backward over ``--iters`` after warm-up, the ratio to unpacked
(the same number of tokens attended, fewer keys per query when packed), and the largest difference
of the output from the ``pieces`` backend. Results: ``packed-attention-<gpu>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from nbtune.models.patches.attention import PACKED_ATTENTION_ENV, attend, build_plan

# (name, query heads, key/value heads, head dim, sliding window, logit softcap)
SHAPES = [
    ("llama3-8b", 32, 8, 128, None, None),
    ("mistral-7b window 1024", 32, 8, 128, 1024, None),
    ("gemma2-9b softcap", 16, 8, 256, 4096, 50.0),
]
BACKENDS = ("unpacked", "pieces", "varlen", "flex")


def document_lengths(layout: str, length: int, rng: random.Random) -> list[int]:
    """Lengths of the documents packed into one row of ``length`` tokens (the last one fills it)."""
    docs, left = [], length
    while left > 0:
        n = rng.randint(1024, 2048) if layout == "long" else rng.randint(120, 280)
        docs.append(min(n, left))
        left -= docs[-1]
    return docs


def position_ids(batch: int, length: int, layout: str, seed: int = 0) -> tuple[torch.Tensor, list]:
    rng = random.Random(seed)
    rows, docs = [], []
    for _ in range(batch):
        lengths = document_lengths(layout, length, rng)
        docs.append(lengths)
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows), docs


def time_fwd_bwd(fn, q, k, v, iters: int) -> float:
    grads = torch.randn_like(q)  # (B, S, H, D), as attend returns
    for _ in range(3):
        out = fn(q, k, v)
        out.backward(grads)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        q.grad = k.grad = v.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(q, k, v)
        out.backward(grads)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_case(shape, layout: str, batch: int, length: int, dtype: torch.dtype, iters: int) -> dict:
    name, hq, hkv, d, window, softcap = shape
    torch.manual_seed(0)
    dev = torch.device("cuda")
    # (B, S, H, D) leaves seen as (B, H, S, D), the layout of the patched attention's projections
    q = torch.randn(batch, length, hq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, length, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, length, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    pos, docs = position_ids(batch, length, layout)
    packed = build_plan(batch, length, position_ids=pos)
    unpacked = build_plan(batch, length)
    scale = d ** -0.5
    row = dict(shape=name, layout=layout, batch=batch, length=length, dtype=str(dtype).replace("torch.", ""),
               documents=sum(len(x) for x in docs), ms={}, max_diff={}, errors={})
    reference = None
    for backend in BACKENDS:
        plan = unpacked if backend == "unpacked" else packed
        os.environ[PACKED_ATTENTION_ENV] = "pieces" if backend == "unpacked" else backend

        def fn(q_, k_, v_, plan=plan):
            return attend(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), plan, scale=scale,
                          window=window, softcap=softcap)

        try:
            with torch.no_grad():
                out = fn(q, k, v).float()
            if backend == "pieces":
                reference = out
            elif backend != "unpacked" and reference is not None:
                row["max_diff"][backend] = float((out - reference).abs().max())
            row["ms"][backend] = round(time_fwd_bwd(fn, q, k, v, iters), 3)
        except Exception as e:  # a backend this GPU or torch cannot run is reported, not hidden
            row["errors"][backend] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        torch.cuda.empty_cache()
    os.environ.pop(PACKED_ATTENTION_ENV, None)
    base = row["ms"].get("unpacked")
    row["vs_unpacked"] = {b: round(base / t, 3) for b, t in row["ms"].items() if base and b != "unpacked"}
    return row


def table(rows: list[dict], gpu: str) -> str:
    lines = [f"# Packed attention, forward + backward ({gpu})", "",
             "median ms (speed relative to the same tokens in unpacked rows); max |out - pieces|", "",
             "| shape | layout | B x S | dtype | docs | unpacked | pieces | varlen | flex |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for b in BACKENDS:
            if b in r["ms"]:
                rel = "" if b == "unpacked" else f" ({r['vs_unpacked'][b]:.2f}x)"
                diff = f", {r['max_diff'][b]:.1e}" if b in r["max_diff"] else ""
                cells.append(f"{r['ms'][b]:.2f}{rel}{diff}")
            else:
                cells.append("error" if b in r["errors"] else "-")
        lines.append(f"| {r['shape']} | {r['layout']} | {r['batch']}x{r['length']} | {r['dtype']} | {r['documents']} | "
                     + " | ".join(cells) + " |")
    errors = [f"- {r['shape']} {r['layout']} {r['dtype']} {b}: {e}" for r in rows for b, e in r["errors"].items()]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("packed_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    major = torch.cuda.get_device_capability()[0]
    cases = [(s, layout, 2, 2048, torch.bfloat16 if major >= 8 else torch.float16)
             for s in SHAPES for layout in ("long", "chat")]
    cases += [(SHAPES[0], layout, 1, 4096, torch.float16) for layout in ("long", "chat")]
    rows = []
    t0 = time.time()
    for shape, layout, b, s, dtype in cases:
        rows.append(run_case(shape, layout, b, s, dtype, args.iters))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = gpu.replace(" ", "-")
    (out / f"packed-attention-{tag}.json").write_text(json.dumps(dict(gpu=gpu, torch=torch.__version__, rows=rows,
                                                                      seconds=round(time.time() - t0, 1)), indent=1))
    text = table(rows, gpu)
    (out / f"packed-attention-{tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
