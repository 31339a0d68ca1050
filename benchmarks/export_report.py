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


def _newest(docs, has):
    found = [(path, doc) for path, doc in docs if has(doc)]
    return found[-1] if found else docs[-1]


def section(docs: list[tuple[str, dict]]) -> list[str]:
    """The newest export run with the capped exports (peak RSS against the cap, time, size), and the
    newest one that checked the GGUF in llama.cpp (a run may do only that: ``--skip merged,nf4``)."""
    if not docs:
        return []
    path, doc = _newest(docs, lambda d: "merged_from_bf16" in d.get("steps", {}))
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
        st = doc.get("steps", {}).get(key)
        if st is None:
            continue
        name = f"{label} ({doc.get('quant')})" if key == "gguf" else label
        capped = ("yes" if st.get("under_cap") else f"no (exit {st.get('returncode')}, OOM kills {st.get('oom_kills')})")
        if not st.get("capped"):
            capped += " (not enforced: no cgroup)"
        lines.append(f"| {name} | {st.get('peak_rss_gb'):.2f} | {capped} | {st.get('seconds'):.0f} | "
                     f"{_gb(st.get('output_bytes'))} |")
    checked = [(p, d) for p, d in docs if (d.get("llama_cpp") or {}).get("loads")]
    if not checked:
        c = (docs[-1][1].get("llama_cpp") or {})
        if c.get("missing"):
            lines += ["", f"The GGUF was not checked in llama.cpp: {c['missing']}."]
        return lines + [""]
    lines += ["", "Each GGUF loads in llama.cpp. Its logits on 16 tokens of a GSM8K question against the reference: "
              "base + adapter merged by peft (transformers) in the precision named, or, in the first runs, nbtune's "
              "merged export read in bf16. Random weights give logits of std ~1.28 over 49,152 tokens, so near-ties "
              "are common and argmax agreement says little; cosine and relative error say more.", "",
              "| run | GGUF | machine | reference | load s | cosine min | cosine mean | rel. error max | rel. error mean "
              "| argmax agree | top-5 overlap |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, doc in checked:
        c, v = doc["llama_cpp"], doc.get("versions", {})
        machine = f"{v.get('cpus')} CPUs" + (f", reference on {v['gpu']}" if v.get("gpu") else "")
        by_ref = c.get("by_reference") or {"merged export (bf16)": c}
        for ref, a in by_ref.items():
            lines.append(f"| {doc.get('stamp')} | {doc.get('quant')} | {machine} | {ref} | {c.get('load_s')} | "
                         f"{a['cosine_min']:.4f} | {a['cosine_mean']:.4f} | {a['rel_error_max']:.2%} | "
                         f"{a['rel_error_mean']:.2%} | {a['argmax_agree']:.0%} | {a['top5_overlap']:.0%} |")
    return lines + [""]
