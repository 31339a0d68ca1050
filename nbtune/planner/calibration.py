"""The planner's side of its calibration: predict a measured configuration, compare, fit.

``calibration.json`` (next to this module) holds peak-memory measurements of nbtune training on a
GPU (written by ``benchmarks/calibrate.py measure``, which needs torch, a GPU and bitsandbytes) and
the coefficients fitted to them, which ``memory.coefficients()`` uses. This module is pure Python
(no torch): ``predict`` replays a record through the planner, ``check`` compares predicted with
measured reserved peaks and the T4 verdicts, ``fit`` finds the coefficients in
``memory.FITTED_FIELDS`` that minimise the squared error relative to the acceptance tolerance
(max(5 %, 0.3 GiB)) over all records (a small Nelder-Mead search) and stores them under ``"fit"``.
A record without ``mlp_tail`` was measured before the checkpointed-tail MLP existed and is
predicted with the old MLP schedule (``memory.Settings.mlp_tail=False``), so old and new
measurements can be checked and fitted. ``check`` is what ``tests/planner/test_planner_calibration.py``
asserts; the command line is ``python benchmarks/calibrate.py measure|fit|check|grid``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

from . import memory
from .gpus import CATALOG as GPUS
from .memory import Coefficients
from .plan import plan
from .shapes import CATALOG as SHAPES
from .shapes import ModelShape

DEFAULT_FILE = memory.CALIBRATION_FILE
T4 = GPUS["T4"]


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One measured configuration: a catalog shape and the training settings that set its memory."""

    shape: str
    batch_size: int
    seq_len: int
    dtype: str  # float16 | bfloat16
    lora_rank: int
    load_in_4bit: bool = True
    gradient_checkpointing: str = "offload"
    optimizer: str = "adamw_8bit"

    @property
    def group(self):
        return (self.shape, self.dtype, self.load_in_4bit)

    def label(self) -> str:
        return (f"{self.shape} {self.batch_size}x{self.seq_len} {self.dtype.replace('loat', '')[:4]} r{self.lora_rank}"
                f" {'4bit' if self.load_in_4bit else '16bit'} {self.gradient_checkpointing} {self.optimizer}")


def point_of(record: dict) -> GridPoint:
    """The configuration a record was measured with."""
    return GridPoint(**{f.name: record[f.name] for f in dataclasses.fields(GridPoint)})


def shape_of(record: dict) -> ModelShape:
    """The shape a record was measured with (its stored dimensions; the catalog's as a fallback)."""
    dims = record.get("shape_dims")
    if dims:
        known = {f.name for f in dataclasses.fields(ModelShape)}
        return ModelShape(**{k: v for k, v in dims.items() if k in known})
    return SHAPES[record["shape"]]


def predict(record: dict, coeffs: Coefficients | None = None, gpu=T4):
    """The planner's plan for a measured record (same shape, settings, loss path and MLP schedule), on
    ``gpu``. A record without ``mlp_tail`` predates the checkpointed-tail MLP: the old schedule."""
    p = plan(shape_of(record), gpu=gpu, seq_len=record["seq_len"], batch_size=record["batch_size"],
             lora_rank=record["lora_rank"], dtype=record["dtype"], load_in_4bit=record["load_in_4bit"],
             gradient_checkpointing=record["gradient_checkpointing"], optimizer=record["optimizer"],
             loss=record.get("loss_path") or "auto", patch=record.get("patched"),
             attention=record.get("attention") or "efficient", coefficients=coeffs)
    return p if record.get("mlp_tail", False) else p.replace(mlp_tail=False)


def tail_expected(record: dict) -> bool:
    """Whether the planner expects today's code to run this record's LoRA MLP as the checkpointed tail."""
    p = predict(dict(record, mlp_tail=True), memory.DEFAULT_COEFFICIENTS)
    return bool(p.estimate.details["mlp_checkpointed_tail"])


def tolerance_gib(measured_gib: float) -> float:
    """The acceptance band: ±5 % or ±0.3 GiB, whichever is larger."""
    return max(0.05 * measured_gib, 0.3)


def load(path=None) -> dict:
    p = Path(path or DEFAULT_FILE)
    if not p.is_file():
        return {"records": []}
    return json.loads(p.read_text(encoding="utf-8"))


def measured_records(data: dict) -> list[dict]:
    return [r for r in data.get("records", []) if r.get("measured_reserved_gib") is not None]


def check(path=None, coeffs: Coefficients | None = None) -> list[dict]:
    """Per measured record: measured and predicted reserved peak, error, tolerance, and T4 fits
    (measured: the peak plus T4's context fits in T4's total; predicted: the plan's ``fits``)."""
    data = load(path)
    if coeffs is None:
        coeffs = _coeffs_from(data)
    rows = []
    for r in measured_records(data):
        p = predict(r, coeffs)
        meas = r["measured_reserved_gib"]
        err = p.reserved_gib - meas
        rows.append(dict(
            label=r.get("label") or point_of(r).label(),
            measured_gib=meas, predicted_gib=p.reserved_gib, error_gib=err, rel_error=err / meas,
            tolerance_gib=tolerance_gib(meas), within=abs(err) <= tolerance_gib(meas),
            t4_measured_fits=meas + T4.context_gib <= T4.total_gib, t4_predicted_fits=p.fits,
            loss_path=r.get("loss_path"),
            # a record measured with the tail-capable code whose MLP schedule is not the one the planner assumes
            mlp_tail_differs="mlp_tail" in r and bool(r["mlp_tail"]) != tail_expected(r)))
    return rows


def _coeffs_from(data: dict) -> Coefficients:
    values = (data.get("fit") or {}).get("coefficients") or {}
    if not values:
        return memory.DEFAULT_COEFFICIENTS
    alloc = memory.measured_alloc_conf(data)
    return memory.DEFAULT_COEFFICIENTS.replace(**{k: float(v) for k, v in values.items() if k in memory.FITTED_FIELDS},
                                              source=f"fitted (calibration.json, {memory.describe_alloc_conf(alloc)})",
                                              alloc_conf=alloc)


def format_rows(rows: list[dict]) -> str:
    head = f"{'configuration':<58}{'measured':>9}{'predicted':>10}{'error':>8}  {'T4 fits (meas/pred)':<20}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "" if r["within"] else "  <-- outside ±5%/0.3 GiB"
        t4 = f"{'yes' if r['t4_measured_fits'] else 'no'}/{'yes' if r['t4_predicted_fits'] else 'no'}"
        if r["t4_measured_fits"] != r["t4_predicted_fits"]:
            mark += "  <-- T4 verdict differs"
        if r.get("mlp_tail_differs"):
            mark += "  <-- MLP schedule differs from the planner's"
        lines.append(f"{r['label']:<58}{r['measured_gib']:9.2f}{r['predicted_gib']:10.2f}{100 * r['rel_error']:+7.1f}%  "
                     f"{t4:<20}{mark}")
    return "\n".join(lines)


def _nelder_mead(f, x0, steps, bounds, iters=400):
    """Minimise f over a box (values clipped into ``bounds``): plain Nelder-Mead, pure Python."""
    clip = lambda x: [min(max(v, lo), hi) for v, (lo, hi) in zip(x, bounds)]  # noqa: E731
    pts = [clip(x0)] + [clip([v + (steps[j] if j == k else 0) for j, v in enumerate(x0)]) for k in range(len(x0))]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(len(pts)), key=vals.__getitem__)
        pts, vals = [pts[k] for k in order], [vals[k] for k in order]
        centroid = [sum(p[j] for p in pts[:-1]) / (len(pts) - 1) for j in range(len(x0))]
        refl = clip([c + (c - w) for c, w in zip(centroid, pts[-1])])
        fr = f(refl)
        if fr < vals[0]:
            exp = clip([c + 2 * (c - w) for c, w in zip(centroid, pts[-1])])
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = clip([c + 0.5 * (w - c) for c, w in zip(centroid, pts[-1])])
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                best = pts[0]
                pts = [best] + [clip([b + 0.5 * (v - b) for b, v in zip(best, p)]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
        if max(vals) - min(vals) < 1e-10:
            break
    k = min(range(len(pts)), key=vals.__getitem__)
    return pts[k], vals[k]


FIT_BOUNDS = {"act_scale": (0.3, 3.0), "saved_scale": (0.3, 3.0), "loss_scale": (0.3, 3.0), "overhead_fixed_gib": (0.0, 2.0),
              "overhead_fraction": (0.0, 0.5)}


def fit(path=None, write: bool = True) -> dict:
    """Fit ``memory.FITTED_FIELDS`` to the measured records; write them under "fit" in the file."""
    p = Path(path or DEFAULT_FILE)
    data = load(p)
    records = measured_records(data)
    if not records:
        raise SystemExit(f"{p}: no measured records to fit (run `measure` on a GPU first)")
    base = memory.DEFAULT_COEFFICIENTS
    names = list(memory.FITTED_FIELDS)

    def coeffs(x):
        return base.replace(**dict(zip(names, x)))

    def objective(x):
        c = coeffs(x)
        total = 0.0
        for r in records:
            meas = r["measured_reserved_gib"]
            err = predict(r, c).reserved_gib - meas
            total += (err / tolerance_gib(meas)) ** 2
        return total

    x0 = [getattr(base, n) for n in names]
    best, value = _nelder_mead(objective, x0, [0.2, 0.2, 0.2, 0.1, 0.03], [FIT_BOUNDS[n] for n in names])
    fitted = coeffs(best)
    rows = check(p, fitted) if p.is_file() else []
    result = dict(
        coefficients={n: round(v, 5) for n, v in zip(names, best)}, n_records=len(records),
        objective=round(value, 4), max_abs_rel_error=round(max((abs(r["rel_error"]) for r in rows), default=0.0), 4),
        all_within_tolerance=all(r["within"] for r in rows),
        t4_verdicts_agree=all(r["t4_measured_fits"] == r["t4_predicted_fits"] for r in rows),
        fitted_on=datetime.date.today().isoformat(), defaults={n: getattr(base, n) for n in names},
    )
    if write:
        data["fit"] = result
        p.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        memory._fitted.cache_clear()
    return result

