"""benchmarks/calibrate.py, the planner's measuring harness: the grid it measures, its command line,
and the measurement code path end to end on a CPU. (The fit and check: tests/planner/test_planner_calibration.py.)"""
import dataclasses
import json
import os

import pytest
from bench_scripts import BENCH, load_script

from nbtune.planner import calibration, memory, plan
from nbtune.planner.shapes import CATALOG

cal = load_script("nbtune_bench_calibrate", os.path.join(BENCH, "calibrate.py"))
GRID = cal.GRID


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


def _records(tmp_path, truth: memory.Coefficients, name: str):
    """A calibration file whose records carry the peak the planner predicts under ``truth``."""
    records = []
    for p in GRID:
        rec = dict(label=p.label(), **dataclasses.asdict(p), shape_dims=dataclasses.asdict(CATALOG[p.shape]),
                   loss_path="fused", patched=True, attention="efficient")
        rec["mlp_tail"] = calibration.tail_expected(rec)
        rec["measured_reserved_gib"] = calibration.predict(rec, truth).reserved_gib
        records.append(rec)
    path = tmp_path / name
    path.write_text(json.dumps({"schema": 1, "date": "2026-01-01", "gpu": "test", "versions": {"torch": "x"},
                                "alloc_conf": "expandable_segments:True", "records": records}))
    return path


def test_command_line_check_grid_and_fit(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"records": []}))
    assert cal.main(["check", str(empty)]) == 0
    assert cal.main(["grid"]) == 0
    assert f"{len(GRID)} configurations" in capsys.readouterr().out
    path = _records(tmp_path, memory.DEFAULT_COEFFICIENTS, "defaults.json")
    assert cal.main(["check", str(path), "--defaults"]) == 0
    table = capsys.readouterr().out
    assert "T4 fits (meas/pred)" in table and "llama-3.1-8b 1x2048" in table
    off = _records(tmp_path, memory.DEFAULT_COEFFICIENTS.replace(act_scale=1.3), "off.json")
    assert cal.main(["check", str(off), "--defaults"]) == 1
    assert cal.main(["fit", str(off)]) == 0
    assert "all within tolerance: True" in capsys.readouterr().out
    assert json.loads(off.read_text())["fit"]["coefficients"]["act_scale"] == pytest.approx(1.3, rel=0.08)


def test_measure_needs_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: measure would run")
    with pytest.raises(SystemExit, match="CUDA"):
        cal.measure(tmp_path / "out.json")


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
    data = cal.measure(out, budget_s=300, device="cpu", grid=grid, shapes={"tiny-llama": tiny}, steps=1,
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
    assert calibration.measured_records(saved) == []
