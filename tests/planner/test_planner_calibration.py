"""The planner's calibration: the fit, the check, the replay of records, and the planner vs the
committed measurements (nbtune/planner/calibration.json). The measuring harness and its grid:
tests/benchmarks/test_calibrate.py."""
import dataclasses
import json

import pytest

from nbtune.planner import calibration, memory
from nbtune.planner.calibration import check, fit, measured_records, tolerance_gib
from nbtune.planner.gpus import CATALOG as GPUS
from nbtune.planner.shapes import CATALOG

# The configurations the committed file measured (benchmarks/calibrate.py's grid)
POINTS = [calibration.point_of(r) for r in calibration.load()["records"]]


def test_planner_matches_the_committed_calibration():
    """Acceptance: predicted vs measured peak reserved within ±5 % or ±0.3 GiB (the larger) on every
    calibrated configuration, and the T4 fits / does-not-fit verdict right on all of them."""
    data = calibration.load()
    records = measured_records(data)
    if not records:
        pytest.skip("nbtune/planner/calibration.json holds no measurements yet: run "
                    "`python benchmarks/calibrate.py measure` on a GPU, copy the JSON there, then `... fit`")
    assert data.get("date") and data.get("versions", {}).get("torch")
    assert len(records) >= 12
    rows = check()
    bad = [r for r in rows if not r["within"]]
    assert not bad, "outside ±5%/0.3 GiB:\n" + calibration.format_rows(bad)
    wrong = [r for r in rows if r["t4_measured_fits"] != r["t4_predicted_fits"]]
    assert not wrong, "T4 verdict differs:\n" + calibration.format_rows(wrong)


def _synthetic(tmp_path, truth: memory.Coefficients, alloc_conf="expandable_segments:True"):
    """Records as today's ``measure`` writes them (``mlp_tail`` where the code takes the tail), with
    the peak the model predicts under ``truth``."""
    records = []
    for p in POINTS:
        rec = dict(label=p.label(), **dataclasses.asdict(p), shape_dims=dataclasses.asdict(CATALOG[p.shape]),
                   loss_path="fused", patched=True, attention="efficient")
        rec["mlp_tail"] = calibration.tail_expected(rec)
        rec["measured_reserved_gib"] = calibration.predict(rec, truth).reserved_gib
        records.append(rec)
    records.append(dict(label="skipped one", **dataclasses.asdict(POINTS[0]), measured_reserved_gib=None,
                        error="skipped (time budget)"))
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"schema": 1, "date": "2026-01-01", "gpu": "test", "versions": {"torch": "x"},
                                "alloc_conf": alloc_conf, "records": records}))
    return path


def test_fit_recovers_the_coefficients_it_was_made_with(tmp_path):
    truth = memory.DEFAULT_COEFFICIENTS.replace(act_scale=1.3, loss_scale=1.0, overhead_fixed_gib=0.45,
                                                overhead_fraction=0.08)
    path = _synthetic(tmp_path, truth)
    before = check(path)
    assert len(before) == len(POINTS) and not all(r["within"] for r in before)  # defaults are off for this truth
    result = fit(path)
    assert result["n_records"] == len(POINTS) and result["all_within_tolerance"]
    got = result["coefficients"]
    assert got["act_scale"] == pytest.approx(1.3, rel=0.08)
    assert got["overhead_fixed_gib"] == pytest.approx(0.45, abs=0.1)
    data = json.loads(path.read_text())
    assert data["fit"]["coefficients"] == got and data["records"]  # stored next to the records
    fitted = memory.coefficients(path)
    assert fitted.act_scale == got["act_scale"] and "fitted to" in fitted.source
    assert fitted.alloc_conf == "expandable_segments:True" and "expandable_segments:True" in fitted.source
    for row in check(path):
        assert abs(row["error_gib"]) <= 0.05 * tolerance_gib(row["measured_gib"]) + 0.02
        assert not row["mlp_tail_differs"]


def test_records_without_mlp_tail_replay_the_old_mlp_schedule():
    """calibration.json's records from before the checkpointed-tail MLP carry no ``mlp_tail``: they are
    predicted with the MLP saving gate/up (what that code ran); new records say which schedule ran."""
    point = next(p for p in POINTS if p.shape == "llama-3.1-8b" and p.seq_len == 16384)
    rec = dict(label=point.label(), **dataclasses.asdict(point), shape_dims=dataclasses.asdict(CATALOG[point.shape]),
               loss_path="fused", patched=True, attention="efficient")
    old = calibration.predict(rec, memory.DEFAULT_COEFFICIENTS)
    new = calibration.predict(dict(rec, mlp_tail=True), memory.DEFAULT_COEFFICIENTS)
    assert not old.estimate.details["mlp_checkpointed_tail"] and new.estimate.details["mlp_checkpointed_tail"]
    assert old.reserved_gib > new.reserved_gib + 0.5  # 16k tokens of gate, up and dh per layer, against one chunk
    assert calibration.tail_expected(rec)
    off = next(p for p in POINTS if p.gradient_checkpointing == "off")
    off_rec = dict(label=off.label(), **dataclasses.asdict(off), shape_dims=dataclasses.asdict(CATALOG[off.shape]))
    assert not calibration.tail_expected(off_rec)


def test_check_flags_a_record_whose_mlp_schedule_the_planner_does_not_expect(tmp_path):
    path = _synthetic(tmp_path, memory.DEFAULT_COEFFICIENTS)
    data = json.loads(path.read_text())
    flipped = next(r for r in data["records"] if r.get("mlp_tail"))
    flipped["mlp_tail"] = False  # e.g. the kernel fell back to the old MLP where the planner assumes the tail
    path.write_text(json.dumps(data))
    rows = check(path, memory.DEFAULT_COEFFICIENTS)
    assert [r["label"] for r in rows if r["mlp_tail_differs"]] == [flipped["label"]]
    assert "MLP schedule differs" in calibration.format_rows(rows)


def test_check_on_files(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"records": []}))
    assert check(empty) == [] and calibration.format_rows([]).startswith("configuration")
    assert check(tmp_path / "missing.json") == []
    rows = check(_synthetic(tmp_path, memory.DEFAULT_COEFFICIENTS), memory.DEFAULT_COEFFICIENTS)
    assert len(rows) == len(POINTS) and all(r["within"] for r in rows)
    table = calibration.format_rows(rows)
    assert "T4 fits (meas/pred)" in table and "llama-3.1-8b 1x2048" in table
    rows = check(_synthetic(tmp_path, memory.DEFAULT_COEFFICIENTS.replace(act_scale=2.0)), memory.DEFAULT_COEFFICIENTS)
    assert not all(r["within"] for r in rows)


def test_the_gpu_catalog_knows_the_t4_numbers_calibration_uses():
    assert calibration.T4 is GPUS["T4"]
    assert calibration.tolerance_gib(2.0) == 0.3 and calibration.tolerance_gib(10.0) == pytest.approx(0.5)
