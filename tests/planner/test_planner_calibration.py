"""Calibration: the grid, the fit, the measurement machinery on CPU, and the planner vs the committed
measurements (nbtune/planner/calibration.json)."""
import dataclasses
import json

import pytest

from nbtune.planner import calibration, memory, plan
from nbtune.planner.calibration import GRID, check, fit, measured_records, tolerance_gib
from nbtune.planner.gpus import CATALOG as GPUS
from nbtune.planner.shapes import CATALOG


def test_planner_matches_the_committed_calibration():
    """Acceptance: predicted vs measured peak reserved within ±5 % or ±0.3 GiB (the larger) on every
    calibrated configuration, and the T4 fits / does-not-fit verdict right on all of them."""
    data = calibration.load()
    records = measured_records(data)
    if not records:
        pytest.skip("nbtune/planner/calibration.json holds no measurements yet: run "
                    "`python -m nbtune.planner.calibration measure` on a GPU, copy the JSON there, then `... fit`")
    assert data.get("date") and data.get("versions", {}).get("torch")
    assert len(records) >= 12
    rows = check()
    bad = [r for r in rows if not r["within"]]
    assert not bad, "outside ±5%/0.3 GiB:\n" + calibration.format_rows(bad)
    wrong = [r for r in rows if r["t4_measured_fits"] != r["t4_predicted_fits"]]
    assert not wrong, "T4 verdict differs:\n" + calibration.format_rows(wrong)


def test_grid_covers_what_the_calibration_must():
    assert len(GRID) >= 12
    shapes = {p.shape for p in GRID}
    assert {"llama-3.1-8b", "llama-2-7b", "qwen2.5-7b"} <= shapes and len(shapes) >= 5
    assert min(p.seq_len for p in GRID) <= 512 and max(p.seq_len for p in GRID) >= 8192
    assert {1, 2, 4} <= {p.batch_size for p in GRID}
    assert {"float16", "bfloat16"} == {p.dtype for p in GRID}
    assert {8, 16, 64} <= {p.lora_rank for p in GRID}
    assert {"offload", "plain", "off"} == {p.gradient_checkpointing for p in GRID}
    assert {True, False} == {p.load_in_4bit for p in GRID}
    assert len({p.label() for p in GRID}) == len(GRID)
    for p in GRID:
        assert p.shape in CATALOG and p.seq_len <= CATALOG[p.shape].max_positions


def test_grid_t4_verdicts_are_not_borderline_and_both_occur():
    """The T4 verdict of each grid point should not hinge on a few hundred MiB of model error."""
    verdicts = []
    for p in GRID:
        pl = plan(CATALOG[p.shape], gpu="T4", seq_len=p.seq_len, batch_size=p.batch_size, lora_rank=p.lora_rank,
                  dtype=p.dtype, load_in_4bit=p.load_in_4bit, gradient_checkpointing=p.gradient_checkpointing,
                  optimizer=p.optimizer, attention="efficient", coefficients=memory.DEFAULT_COEFFICIENTS)
        assert abs(pl.margin_gib - pl.required_margin_gib) > 0.5, p.label()
        verdicts.append(pl.fits)
    assert any(verdicts) and not all(verdicts)


def _synthetic(tmp_path, truth: memory.Coefficients, alloc_conf="expandable_segments:True"):
    """Records as today's ``measure`` writes them (``mlp_tail`` where the code takes the tail), with
    the peak the model predicts under ``truth``."""
    records = []
    for p in GRID:
        rec = dict(label=p.label(), **dataclasses.asdict(p), shape_dims=dataclasses.asdict(CATALOG[p.shape]),
                   loss_path="fused", patched=True, attention="efficient")
        rec["mlp_tail"] = calibration.tail_expected(rec)
        rec["measured_reserved_gib"] = calibration.predict(rec, truth).reserved_gib
        records.append(rec)
    records.append(dict(label="skipped one", **dataclasses.asdict(GRID[0]), measured_reserved_gib=None,
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
    assert len(before) == len(GRID) and not all(r["within"] for r in before)  # defaults are off for this truth
    result = fit(path)
    assert result["n_records"] == len(GRID) and result["all_within_tolerance"]
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
    point = next(p for p in GRID if p.shape == "llama-3.1-8b" and p.seq_len == 16384)
    rec = dict(label=point.label(), **dataclasses.asdict(point), shape_dims=dataclasses.asdict(CATALOG[point.shape]),
               loss_path="fused", patched=True, attention="efficient")
    old = calibration.predict(rec, memory.DEFAULT_COEFFICIENTS)
    new = calibration.predict(dict(rec, mlp_tail=True), memory.DEFAULT_COEFFICIENTS)
    assert not old.estimate.details["mlp_checkpointed_tail"] and new.estimate.details["mlp_checkpointed_tail"]
    assert old.reserved_gib > new.reserved_gib + 0.5  # 16k tokens of gate, up and dh per layer, against one chunk
    assert calibration.tail_expected(rec)
    off = next(p for p in GRID if p.gradient_checkpointing == "off")
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


def test_check_and_cli_on_files(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"records": []}))
    assert check(empty) == []
    assert calibration.main(["check", str(empty)]) == 0
    assert calibration.main(["grid"]) == 0
    out = capsys.readouterr().out
    assert f"{len(GRID)} configurations" in out
    path = _synthetic(tmp_path, memory.DEFAULT_COEFFICIENTS)
    assert calibration.main(["check", str(path), "--defaults"]) == 0
    table = capsys.readouterr().out
    assert "T4 fits (meas/pred)" in table and "llama-3.1-8b 1x2048" in table
    off = _synthetic(tmp_path, memory.DEFAULT_COEFFICIENTS.replace(act_scale=2.0))
    assert calibration.main(["check", str(off), "--defaults"]) == 1


def test_measure_needs_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: measure would run")
    with pytest.raises(SystemExit, match="CUDA"):
        calibration.measure(tmp_path / "out.json")


def test_measure_smoke_run_on_cpu(tmp_path, kernel_mode):
    """The measurement code path end to end on CPU at a tiny size: random checkpoint with a tokenizer,
    nbtune.load_model, nbtune.add_lora in two checkpointing modes with the adapter stripped in between,
    AdamW 8-bit and fp32, the loss-path, patch and MLP-schedule detection, the JSON (with no memory
    figures). The fused kernels run (Triton's interpreter on a CPU), as on a GPU."""
    pytest.importorskip("torch")
    kernel_mode("triton")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    tiny = dataclasses.replace(CATALOG["llama-3.1-8b"], name="tiny-llama", num_layers=2, vocab_size=300,
                               hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                               max_positions=512)
    grid = [calibration.GridPoint("tiny-llama", 2, 32, "bfloat16", 4, False, "offload", "adamw_8bit"),
            calibration.GridPoint("tiny-llama", 1, 32, "bfloat16", 8, False, "off", "adamw")]
    out = tmp_path / "smoke.json"
    data = calibration.measure(out, budget_s=300, device="cpu", grid=grid, shapes={"tiny-llama": tiny}, steps=1,
                               ckpt_root=str(tmp_path / "ckpt"))
    saved = json.loads(out.read_text())
    assert saved["records"] == data["records"] and len(saved["records"]) == 2
    for rec, point in zip(saved["records"], grid):
        assert rec["error"] is None and rec["label"] == point.label()
        assert rec["measured_reserved_gib"] is None  # nothing measured on a CPU: never a calibration record
        assert rec["first_loss"] > 0 and rec["patched"] is True and rec["loss_path"] == "fused"
        assert rec["shape_dims"]["hidden_size"] == 64
        # forward hooks saw every MLP call (2 layers, 1 step); the checkpointed-tail MLP ran under
        # offloaded checkpointing, the MLP that saves gate/up without checkpointing
        assert sum(rec["mlp_output_nodes"].values()) >= 2
        assert rec["mlp_tail"] is (point.gradient_checkpointing == "offload"), rec["mlp_output_nodes"]
    assert saved["alloc_conf"] == memory.allocator_setting()
    assert saved["versions"]["torch"] and saved["date"]
    assert not (tmp_path / "ckpt" / "tiny-llama").exists()  # the checkpoint is removed after its last group
    assert measured_records(saved) == []


def test_the_gpu_catalog_knows_the_t4_numbers_calibration_uses():
    assert calibration.T4 is GPUS["T4"]
    assert calibration.tolerance_gib(2.0) == 0.3 and calibration.tolerance_gib(10.0) == pytest.approx(0.5)
