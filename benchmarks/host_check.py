"""The planner's host-RAM figure against what nbtune's benchmark runs measured.

    python benchmarks/host_check.py benchmarks/results/trainer-*.json benchmarks/results/models-*.json
    python benchmarks/host_check.py --json FILES...     # the same, as JSON

Every nbtune line of benchmarks/trainer.py (``nbtune.finetune``) and of benchmarks/models.py's
bare loop (its T4 rows under the host cap included) carries the planner's host peak for that run
(``plan_host_peak_gib``, planned on the machine it ran on: this process's baseline, the run's
checkpointing with its offloaded layers) and the host memory the process held
(benchmarks/peers/bench_common.py's ``HostMemory``). The measured peak is what a memory cgroup
cannot take back:

    max(anonymous peak while loading, anonymous peak while training) + the file pages at the
    training peak (the libraries' code, which stays resident; the checkpoint's file pages, which
    the kernel reclaims under a cap, are left out)

(the offload pool's page-locked slabs are anonymous memory). Each is compared with the planner's
acceptance band, ±5 % or ±0.3 GiB whichever is larger (:func:`nbtune.planner.calibration.tolerance_gib`).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from nbtune.planner.calibration import tolerance_gib  # noqa: E402


def measured_host_gib(line: dict) -> float | None:
    """The host peak a run's line measured (see the module docstring), or None without readings."""
    if "anon_train_peak_gib" not in line or "file_at_train_peak_gib" not in line:
        return None
    anon = max(line.get("anon_load_peak_gib") or 0.0, line["anon_train_peak_gib"])
    return anon + line["file_at_train_peak_gib"]


def _nbtune_lines(doc: dict, source: str):
    """(run, row label, line) for every nbtune line of a trainer or models results file."""
    run = os.path.basename(source).rsplit(".", 1)[0]
    for row in doc.get("rows", []):
        results = row.get("results") or {}
        for peer, res in results.items():
            if peer == "nbtune" and (res or {}).get("line"):
                yield run, row.get("id"), res["line"]
        for peer, search in (row.get("search") or {}).items():
            if peer != "nbtune":
                continue
            for attempt in search.get("attempts", []):
                if attempt.get("line"):
                    yield run, f"{row.get('id')} at {attempt.get('seq')}", attempt["line"]


def compare(paths: list[str]) -> list[dict]:
    """One record per nbtune line that has both a plan and a measurement."""
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        for run, row, line in _nbtune_lines(doc, path):
            planned, measured = line.get("plan_host_peak_gib"), measured_host_gib(line)
            if planned is None or measured is None:
                continue
            terms = line.get("plan_host_terms") or {}
            offloaded = terms.get("offloaded activations", 0.0)
            err = planned - measured
            out.append(dict(run=run, row=row, planned_gib=round(planned, 3), measured_gib=round(measured, 3),
                            error_gib=round(err, 3), error_pct=round(100 * err / measured, 1),
                            within=abs(err) <= tolerance_gib(measured), offloaded_gib=offloaded,
                            offload_layers=line.get("offload_layers", line.get("plan_offload_layers")),
                            gradient_checkpointing=line.get("gradient_checkpointing", line.get("gc_mode")),
                            anon_load_peak_gib=line.get("anon_load_peak_gib"),
                            anon_train_peak_gib=line.get("anon_train_peak_gib"),
                            file_at_train_peak_gib=line.get("file_at_train_peak_gib"),
                            rss_baseline_gib=line.get("rss_baseline_gib"),
                            cap_gb=line.get("host_cap_gb")))
    return out


def table(records: list[dict]) -> str:
    head = ("| run | row | offloaded inputs GiB | planned GiB | measured GiB | error | within ±5 %/0.3 GiB |\n"
            "|---|---|---|---|---|---|---|")
    rows = [f"| {r['run']} | {r['row']} | {r['offloaded_gib']:.2f} | {r['planned_gib']:.2f} | {r['measured_gib']:.2f} "
            f"| {r['error_gib']:+.2f} GiB ({r['error_pct']:+.1f}%) | {'yes' if r['within'] else 'NO'} |"
            for r in records]
    n_in = sum(r["within"] for r in records)
    n_off = sum(r["within"] and r["offloaded_gib"] > 0 for r in records)
    return "\n".join([head, *rows, "", f"{n_in} of {len(records)} within the band, {n_off} of them offloading."])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="trainer-*.json / models-*.json results (globs allowed)")
    ap.add_argument("--json", action="store_true", help="print the records as JSON")
    args = ap.parse_args(argv)
    paths = sorted({p for pattern in args.files for p in (glob.glob(pattern) or [pattern])})
    records = compare(paths)
    print(json.dumps(records, indent=1) if args.json else table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
