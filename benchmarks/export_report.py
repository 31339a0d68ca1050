"""RESULTS.md's export section, from benchmarks/results/export-8b-*.json (benchmarks/export_8b.py)."""
from __future__ import annotations

import glob
import json
import os

STEPS = (("gguf", "GGUF from the 16-bit base"), ("merged_from_bf16", "merged float16 from the 16-bit base"),
         ("merged_from_nf4", "merged float16 from the NF4 base"))


def export_docs_in(folders: list[str]) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted({p for d in folders for p in glob.glob(os.path.join(d, "export-8b-*.json"))}):
        with open(path) as f:
            docs.append((path, json.load(f)))
    return docs


def _gb(n) -> str:
    return f"{n / 1e9:.2f}" if n else "—"


def section(docs: list[tuple[str, dict]]) -> list[str]:
    """The newest export run: each export's peak RSS against the cap, time and size; the GGUF in llama.cpp."""
    if not docs:
        return []
    path, doc = docs[-1]
    m, v = doc.get("model", {}), doc.get("versions", {})
    lines = ["## Export at full size (benchmarks/export_8b.py)", "",
             f"Generated from `benchmarks/results/{os.path.basename(path)}`. {doc.get('shape')}-shaped checkpoint, "
             f"random weights ({m.get('params', 0) / 1e9:.2f} B parameters, {m.get('layers')} layers, SmolLM2's "
             f"{m.get('vocab')}-token vocabulary; {_gb(m.get('base_bytes'))} GB in bf16, {_gb(m.get('nf4_bytes'))} GB "
             f"as NF4), a random LoRA adapter (r {m.get('lora_r')}, seven projections). Each export runs in its own "
             f"process in a memory cgroup capped at {doc.get('cap_gb')} GB (free Colab's RAM): going over is an OOM "
             f"kill. Peak RSS: the process's largest resident set, imports included. Machine: {v.get('cpus')} CPUs; "
             f"torch {v.get('torch')}, transformers {v.get('transformers')}, gguf {v.get('gguf')}, "
             f"llama-cpp-python {v.get('llama_cpp')}.", "",
             "| export | peak RSS GB | under the cap | seconds | output GB |", "|---|---|---|---|---|"]
    for key, label in STEPS:
        s = doc.get("steps", {}).get(key)
        if s is None:
            continue
        name = f"{label} ({doc.get('quant')})" if key == "gguf" else label
        capped = ("yes" if s.get("under_cap") else f"no (exit {s.get('returncode')}, OOM kills {s.get('oom_kills')})")
        if not s.get("capped"):
            capped += " (not enforced: no cgroup)"
        lines.append(f"| {name} | {s.get('peak_rss_gb'):.2f} | {capped} | {s.get('seconds'):.0f} | "
                     f"{_gb(s.get('output_bytes'))} |")
    c = doc.get("llama_cpp")
    if c and c.get("missing"):
        lines += ["", f"The GGUF was not checked in llama.cpp: {c['missing']}."]
    elif c:
        lines += ["", f"The {doc.get('quant')} GGUF loads in llama.cpp ({c['load_s']} s). Its logits on {c['tokens']} "
                  f"tokens of a GSM8K question against the merged model's (transformers, bf16): cosine similarity "
                  f"min {c['cosine_min']:.4f} (mean {c['cosine_mean']:.4f}), relative error max {c['rel_error_max']:.2%} "
                  f"(mean {c['rel_error_mean']:.2%}), argmax agreement {c['argmax_agree']:.0%}, top-5 overlap "
                  f"{c['top5_overlap']:.0%} (random weights: logits of std {c['logit_std']}, so near-ties are common)."]
    return lines + [""]
