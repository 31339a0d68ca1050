"""Tables of benchmarks/trainer.py's results: one run's markdown, the lead section of RESULTS.md,
and the plain summary printed at the end of a GPU run.

Pure functions over the result documents (results/trainer-*.json), no torch: benchmarks/models.py
puts :func:`lead_section` at the top of RESULTS.md when trainer results exist.
"""
from __future__ import annotations

import glob
import json
import os
import sys

PEER_LABELS = {"nbtune": "nbtune.finetune", "unsloth": "Unsloth + TRL SFTTrainer",
               "trl": "TRL SFTTrainer + peft + bnb"}
DPO_PEER_LABELS = {"nbtune": "nbtune.finetune (dpo)", "unsloth": "Unsloth PatchDPOTrainer + TRL DPOTrainer",
                   "trl": "TRL DPOTrainer + peft + bnb"}
GRPO_PEER_LABELS = {"nbtune": "nbtune.finetune (grpo)", "unsloth": "Unsloth PatchFastRL + TRL GRPOTrainer",
                    "trl": "TRL GRPOTrainer + peft + bnb"}
PEER_ORDER = ["nbtune", "unsloth", "trl"]
MEASURED = ("ok", "oom")
FIRST_LOSS_NOTE = 1e-2  # same weights, same first batch: a larger gap means another batch or another computation

PROTOCOL = (
    "Each peer trains in its own process through its trainer, as a user runs it: nbtune.finetune (metrics "
    "stream and notebook dashboard on), Unsloth's FastLanguageModel + TRL's SFTTrainer, and TRL's SFTTrainer + "
    "peft + bitsandbytes. Same checkpoint (by default llama3-8b dimensions, random weights, SmolLM2's tokenizer "
    "and vocabulary), same rows (text: plain-text rows of GSM8K passages, 1,024-2,048 tokens by default; gsm8k: "
    "GSM8K question + answer conversations), same settings (4-bit NF4, LoRA r=16 on the seven projections, "
    "AdamW 8-bit, lr 2e-4, one micro-batch per step, logging every step). Real tokens are the trainer's own "
    "count of non-padding input tokens; s/step is the median after the warm-up steps, real tokens/s their "
    "tokens over their time; fill = real tokens per step / (batch × seq); memory = peak reserved during "
    "training. T4 emulation: fp16, the allocator capped at 14.3 GiB, SDPA's memory-efficient backend only. "
    "Ratios compare peers of the same run only; the run's line below says what it trained on."
)


DPO_PROTOCOL = (
    "DPO rows: nbtune.finetune with train.method dpo, Unsloth's PatchDPOTrainer() + TRL's DPOTrainer, and TRL's "
    "DPOTrainer + peft + bitsandbytes; beta 0.1, sigmoid loss, max_length = seq, no reference model (the policy "
    "with its fresh LoRA adapter: nbtune scores the reference with the adapter off, TRL with a frozen copy of "
    "the adapter, the same log-probs), reference log-probs computed every step, same LoRA, optimizer and lr as "
    "above. Data: GSM8K preference pairs (chosen: the worked answer; rejected: the same with another final "
    "number) whose prompt holds earlier GSM8K exchanges, seq/2..seq tokens per pair. A step reads 2 × batch "
    "sequences (prompt + chosen, prompt + rejected): real tokens are their non-padding tokens (the reference "
    "forward not counted again), fill = real tokens per step / (2 × batch × seq). planned: the planner's "
    "reserved peak for nbtune's config (`nbtune plan`; its peak adds the CUDA context), beside the measured "
    "peak reserved; plan − measured > 0 is an over-prediction."
)


GRPO_PROTOCOL = (
    "GRPO rows: nbtune.finetune with train.method grpo, Unsloth's PatchFastRL(\"GRPO\", FastLanguageModel) + TRL's "
    "GRPOTrainer (fast_inference=False), and TRL's GRPOTrainer + peft + bitsandbytes; every one samples with the "
    "model's own generate and KV cache (no vLLM). batch = prompts per step, 4 completions each (one generation "
    "per step); seq = prompt + completion budget, completions up to seq/2 tokens, temperature 1.0, beta 0.0 (no "
    "KL term), TRL's default loss, reward the GSM8K final-number match, same LoRA, optimizer and lr as above. "
    "Data: GSM8K questions with the instruction to end with '#### <number>', prompts of at most seq/2 tokens. "
    "Random weights score 0 and write to the length limit: the rows measure speed and memory. tokens/s: the "
    "prompt + completion tokens the trainer counts per step over the step's time; generation tok/s: completion "
    "tokens per second of sampling, timed from an idle device to the completions on the host; gen share: "
    "sampling's part of the step time; completion: mean completion length. planned: the planner's reserved peak "
    "for nbtune's config beside the measured peak reserved (its generation term in the line's plan_terms)."
)


def is_dpo(rec: dict) -> bool:
    return rec.get("method") == "dpo"


def is_grpo(rec: dict) -> bool:
    return rec.get("method") == "grpo"


def fmt_num(value, digits=0, thousands=True) -> str:
    if value is None:
        return "—"
    if digits == 0:
        return f"{round(value):,}" if thousands else str(round(value))
    return f"{value:.{digits}f}"


def status_cell(job: dict | None) -> str:
    if not job:
        return "—"
    status = job.get("status") or "—"
    detail = (job.get("detail") or "").replace("|", "/").strip()
    if status == "ok":
        return "ok"
    if status == "oom":
        return "OOM"
    if status == "not_reached":
        return "not reached" + (f" ({detail})" if detail else "")
    return f"{status}: {detail[:160]}" if detail else status


def speed_ratio(results: dict, peer: str, key: str = "tokens_per_s") -> str:
    """nbtune's real tokens/s (or another rate of the lines, ``key``) over this peer's, same run."""
    def tps(p):
        job = results.get(p) or {}
        line = job.get("line") or {}
        return line.get(key) if job.get("status") == "ok" else None

    nb, other = tps("nbtune"), tps(peer)
    if peer == "nbtune" or not nb or not other:
        return "—"
    return f"{nb / other:.2f}×"


def peer_cells(results: dict, peer: str) -> list[str]:
    job = results.get(peer) or {}
    line = job.get("line") if job.get("status") == "ok" else None
    line = line or {}
    return [PEER_LABELS.get(peer, peer), fmt_num(line.get("tokens_per_s")),
            fmt_num(line.get("s_per_step"), 3), fmt_num(line.get("fill"), 2),
            fmt_num(line.get("peak_reserved_gib"), 2), speed_ratio(results, peer), status_cell(job)]


def ok_line(results: dict, peer: str) -> dict:
    job = results.get(peer) or {}
    return (job.get("line") or {}) if job.get("status") == "ok" else {}


def plan_cells(results: dict, peer: str) -> list[str]:
    """nbtune's planned reserved peak and its error against the measured peak (other peers: —)."""
    job = results.get(peer) or {}
    line = job.get("line") or {}  # an OOM's line carries the plan too
    planned, measured = line.get("plan_reserved_gib"), ok_line(results, peer).get("peak_reserved_gib")
    err = planned - measured if planned is not None and measured is not None else None
    return [fmt_num(planned, 2), "—" if err is None else f"{err:+.2f}"]


def loss_cell(results: dict, peer: str) -> str:
    line = ok_line(results, peer)
    if line.get("first_loss") is None:
        return "—"
    return f"{line['first_loss']:.4f} → {line['last_loss']:.4f}"


def dpo_peer_cells(results: dict, peer: str) -> list[str]:
    cells = peer_cells(results, peer)
    cells[0] = DPO_PEER_LABELS.get(peer, peer)
    return cells[:5] + plan_cells(results, peer) + [loss_cell(results, peer)] + cells[5:]


def grpo_peer_cells(results: dict, peer: str) -> list[str]:
    """A GRPO line's cells: step tokens/s and s/step, generation tok/s, its share of the step and the
    mean completion length, memory against the plan, the nbtune ratios (step and generation), status."""
    line = ok_line(results, peer)
    share = line.get("generation_share")
    return [GRPO_PEER_LABELS.get(peer, peer), fmt_num(line.get("tokens_per_s")), fmt_num(line.get("s_per_step"), 3),
            fmt_num(line.get("generation_tokens_per_s")), "—" if share is None else f"{100 * share:.0f}%",
            fmt_num(line.get("completion_length_mean")), fmt_num(line.get("peak_reserved_gib"), 2),
            *plan_cells(results, peer), speed_ratio(results, peer),
            speed_ratio(results, peer, "generation_tokens_per_s"), status_cell(results.get(peer))]


def ordered_peers(results: dict) -> list[str]:
    return [p for p in PEER_ORDER if p in results] + [p for p in results if p not in PEER_ORDER]


HEADER = ["row", "peer", "real tokens/s", "s/step", "fill", "peak reserved GiB", "nbtune speed ×", "status"]


def peer_table(rows: list[tuple[str | None, dict]], header: list[str], cells_of) -> list[str]:
    """One line per (row, peer) under ``header``: the row's label, its run where any row has one, then
    ``cells_of(results, peer)``; ``rows``: (run label or None, row record)."""
    with_run = any(run for run, _ in rows)
    head = header[:1] + (["run"] if with_run else []) + header[1:]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, rec in rows:
        results = rec.get("results", {})
        for peer in ordered_peers(results):
            cells = [rec.get("label", rec.get("id", "?"))] + ([run or ""] if with_run else [])
            out.append("| " + " | ".join(cells + cells_of(results, peer)) + " |")
    return out


def table(rows: list[tuple[str | None, dict]]) -> list[str]:
    """The SFT rows: one line per (row, peer)."""
    return peer_table(rows, HEADER, peer_cells)


DPO_HEADER = ["row", "peer", "real tokens/s", "s/step", "fill", "peak reserved GiB", "planned GiB",
              "plan − measured", "loss first → last", "nbtune speed ×", "status"]


def dpo_table(rows: list[tuple[str | None, dict]]) -> list[str]:
    """The DPO rows: one line per (row, peer), with nbtune's planned peak beside the measured one."""
    return peer_table(rows, DPO_HEADER, dpo_peer_cells)


GRPO_HEADER = ["row", "peer", "tokens/s", "s/step", "generation tok/s", "gen share", "completion",
               "peak reserved GiB", "planned GiB", "plan − measured", "nbtune speed ×", "nbtune generation ×",
               "status"]


def grpo_table(rows: list[tuple[str | None, dict]]) -> list[str]:
    """The GRPO rows: one line per (row, peer), the sampling's throughput beside the step's and the memory."""
    return peer_table(rows, GRPO_HEADER, grpo_peer_cells)


def tables(rows: list[tuple[str | None, dict]], heading: str = "###") -> list[str]:
    """The SFT rows' table, then (where there are any) the DPO rows' and the GRPO rows' under their own
    headings."""
    sft = [(run, rec) for run, rec in rows if not is_dpo(rec) and not is_grpo(rec)]
    dpo = [(run, rec) for run, rec in rows if is_dpo(rec)]
    grpo = [(run, rec) for run, rec in rows if is_grpo(rec)]
    out = table(sft) if sft or not (dpo or grpo) else []
    if dpo:
        out += ([""] if out else []) + [f"{heading} DPO", "", DPO_PROTOCOL, "", *dpo_table(dpo)]
    if grpo:
        out += ([""] if out else []) + [f"{heading} GRPO", "", GRPO_PROTOCOL, "", *grpo_table(grpo)]
    return out


def meta_line(doc: dict) -> str:
    m = doc.get("meta", {})
    v, vp = m.get("versions", {}) or {}, m.get("versions_peer", {}) or {}
    parts = [f"GPU {m.get('gpu', '?')}"]
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "nbtune"):
        if v.get(name):
            parts.append(f"{name} {v[name]}")
    if vp.get("unsloth") or v.get("unsloth"):
        parts.append(f"unsloth {vp.get('unsloth') or v.get('unsloth')} (trl {vp.get('trl') or v.get('trl')})")
    steps = m.get("steps")
    if steps:
        parts.append(f"{steps[0]} warm-up + {steps[1]} timed steps")
    data = m.get("data") or {}
    for name in ("text", "gsm8k"):
        d = data.get(name)
        if d:
            parts.append(f"{name}: {d['rows']:,} rows of {d['min']:,}-{d['max']:,} tokens (mean {d['mean']:,})")
    for name in sorted((n for n in data if n.startswith("dpo-")), key=lambda n: (len(n), n)):
        d = data[name]
        parts.append(f"{name}: {d['rows']:,} pairs of {d['min']:,}-{d['max']:,} tokens (longer sequence, "
                     f"mean {d['mean']:,})")
    for name in sorted((n for n in data if n.startswith("grpo-")), key=lambda n: (len(n), n)):
        d = data[name]
        parts.append(f"{name}: {d['rows']:,} prompts of {d['min']:,}-{d['max']:,} tokens (mean {d['mean']:,})")
    if m.get("unavailable"):
        parts.append("skipped: " + "; ".join(f"{k} ({w})" for k, w in m["unavailable"].items()))
    if m.get("tag"):
        parts.append(f"tag: {m['tag']}")
    return ", ".join(parts)


def notes(doc: dict) -> list[str]:
    out = []
    for rec in doc.get("rows", []):
        for peer, job in rec.get("results", {}).items():
            if job.get("status") not in ("ok", "oom") and job.get("detail"):
                out.append(f"- {rec.get('id')} · {peer}: {job['status']}: {job['detail']}")
        checks = rec.get("checks") or {}
        for peer, ok in (checks.get("same_tokens") or {}).items():
            if ok is False:
                out.append(f"- {rec.get('id')} · {peer}: its steps saw other token counts than nbtune's "
                           "(another row order or tokenization)")
        for peer, diff in (checks.get("first_loss_diff") or {}).items():
            if diff is not None and diff > FIRST_LOSS_NOTE:
                out.append(f"- {rec.get('id')} · {peer}: first loss {diff:.3g} away from nbtune's")
        for peer, job in rec.get("results", {}).items():
            line = job.get("line") or {}
            dash = line.get("dashboard")
            if dash and dash != "on":
                out.append(f"- {rec.get('id')} · {peer}: dashboard {dash}")
            if is_dpo(rec) and line.get("reference") == "ref adapter":
                out.append(f"- {rec.get('id')} · {peer}: reference scored with TRL's frozen copy of the fresh adapter "
                           "(nbtune: the adapter switched off; the same log-probs, the copy's LoRA matmuls on top)")
            if (is_dpo(rec) or is_grpo(rec)) and line.get("plan_error"):
                out.append(f"- {rec.get('id')} · {peer}: no plan: {line['plan_error']}")
            for kind in ("dpo", "grpo"):
                if line.get(f"{kind}_config_left_out"):
                    out.append(f"- {rec.get('id')} · {peer}: {kind.upper()}Config of TRL {line.get('trl')} lacks "
                               f"{', '.join(line[f'{kind}_config_left_out'])} (left out)")
            if is_grpo(rec) and line.get("generation_timed") not in (None, "_generate_single_turn"):
                out.append(f"- {rec.get('id')} · {peer}: generation timed around {line['generation_timed']} (this "
                           "TRL has no _generate_single_turn): its time includes tokenizing and decoding")
    return out


def run_markdown(doc: dict, label: str) -> str:
    lines = [f"# Trainer path benchmark: {label}", "", meta_line(doc), "", PROTOCOL, ""]
    lines += tables([(None, rec) for rec in doc.get("rows", [])], "##")
    extra = notes(doc)
    if extra:
        lines += ["", "Notes:", *extra]
    return "\n".join(lines) + "\n"


DATA_ORDER = {"text": 0, "gsm8k": 1}
METHOD_ORDER = {"sft": 0, "dpo": 1, "grpo": 2}
DTYPE_ORDER = {"bfloat16": 0, "float16": 1, "float32": 2}


def row_key(rec: dict):
    """benchmarks/trainer.py's order: SFT rows, then DPO rows, then GRPO rows; T4 rows last of the SFT rows; text,
    then gsm8k; bf16 2x2048 before fp16 1x2048; packed first."""
    return (METHOD_ORDER.get(rec.get("method") or "sft", 9), bool(rec.get("t4")), DATA_ORDER.get(rec.get("data"), 9),
            rec.get("data", ""), DTYPE_ORDER.get(rec.get("dtype"), 9), -int(rec.get("batch") or 0),
            int(rec.get("seq") or 0), not rec.get("packing"))


def run_label(path: str) -> str:
    return os.path.basename(path).replace("trainer-", "").replace(".json", "")


def latest_rows(docs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Each (row, peer)'s newest measurement (ok or OOM), grouped by the run that made it, in the row
    order: a row whose peers were last measured in different runs appears once per run, each with its
    own peers, so a ratio only ever compares peers of one run."""
    entries: dict[tuple[str, str], tuple[str, dict]] = {}
    seen: set[tuple[str, str]] = set()
    for path, doc in reversed(docs):  # newest first
        for rec in doc.get("rows", []):
            for peer, job in rec.get("results", {}).items():
                if job.get("status") not in MEASURED or (rec["id"], peer) in seen:
                    continue
                seen.add((rec["id"], peer))
                run = run_label(path)
                _, entry = entries.setdefault((rec["id"], run), (run, dict(rec, results={})))
                entry["results"][peer] = job
    return sorted(entries.values(), key=lambda x: (row_key(x[1]), x[0]))


def lead_section(docs: list[tuple[str, dict]]) -> list[str]:
    """RESULTS.md's first section: the latest trainer-path measurement of every row ([] without any)."""
    rows = latest_rows(docs)
    if not rows:
        return []
    newest_path, newest = docs[-1]
    return ["## Trainer path: nbtune.finetune vs Unsloth + TRL vs TRL + peft + bitsandbytes", "",
            "Generated by `python benchmarks/trainer.py --from-json` from `benchmarks/results/trainer-*.json`. "
            + PROTOCOL, "", *tables(rows), "", f"Newest run ({run_label(newest_path)}): {meta_line(newest)}", ""]


def load_docs(paths: list[str]) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(paths, key=os.path.basename):
        try:
            with open(path) as f:
                docs.append((path, json.load(f)))
        except (OSError, ValueError) as exc:
            print(f"# skipping {path}: {exc}", file=sys.stderr)
    return docs


def trainer_docs_in(folders: list[str]) -> list[tuple[str, dict]]:
    paths = sorted({p for d in folders for p in glob.glob(os.path.join(d, "trainer-*.json"))})
    return load_docs(paths)


def summary_text(doc: dict) -> str:
    out = [f"== trainer: {meta_line(doc)}"]
    for rec in doc.get("rows", []):
        results = rec.get("results", {})
        for peer in ordered_peers(results):
            cells = peer_cells(results, peer)
            plan = gen = ""
            method_row = is_dpo(rec) or is_grpo(rec)
            if method_row and ((results.get(peer) or {}).get("line") or {}).get("plan_reserved_gib") is not None:
                planned, err = plan_cells(results, peer)
                plan = f"  planned {planned} ({err})"
            if is_grpo(rec):
                g = grpo_peer_cells(results, peer)
                gen = f"  gen tok/s {g[3]:>7} ({g[4]:>4} of the step)  gen nbtune× {g[10]:>6}"
            out.append(f"{rec['id']:<28} {peer:<8} tok/s {cells[1]:>8}  s/step {cells[2]:>7}  fill {cells[3]:>5}  "
                       f"GiB {cells[4]:>6}{plan}{gen}  nbtune× {cells[5]:>6}  {cells[6]}")
    return "\n".join(out)
