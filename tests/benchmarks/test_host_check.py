"""benchmarks/host_check.py: the planner's host peak against the runs' measured host memory."""
import json
import os

import pytest

from bench_scripts import BENCH, load_script

host_check = load_script("bench_host_check", os.path.join(BENCH, "host_check.py"))


def _line(planned, anon_load, anon_train, file_train, offloaded):
    return dict(plan_host_peak_gib=planned, anon_load_peak_gib=anon_load, anon_train_peak_gib=anon_train,
                file_at_train_peak_gib=file_train, file_at_load_peak_gib=14.8, rss_hwm_gib=15.0,
                plan_host_terms={"offloaded activations": offloaded}, gradient_checkpointing="offload")


def test_measured_peak_is_owned_memory_plus_the_libraries_pages_not_the_checkpoints():
    # loading peaked at 2.0 GiB owned (14.8 GiB of checkpoint file pages beside it: reclaimable)
    assert host_check.measured_host_gib(_line(3.0, 2.0, 1.5, 0.4, 1.0)) == pytest.approx(2.4)
    # training peaked higher (offload buffers)
    assert host_check.measured_host_gib(_line(3.0, 2.0, 10.5, 0.4, 9.0)) == pytest.approx(10.9)
    assert host_check.measured_host_gib({"plan_host_peak_gib": 3.0, "rss_hwm_gib": 4.0}) is None


def test_compare_reads_trainer_rows_and_t4_search_attempts(tmp_path, capsys):
    trainer = {"rows": [
        {"id": "text-2x2048-bf16-packed", "results": {
            "nbtune": {"line": _line(2.6, 1.9, 2.2, 0.35, 1.0)},        # 2.55 measured: within 0.3 GiB
            "unsloth": {"line": _line(9.0, 1.0, 1.0, 0.1, 0.0)}}},      # not nbtune: ignored
        {"id": "gsm8k-1x2048-fp16-unpacked", "results": {
            "nbtune": {"line": {"plan_host_peak_gib": 2.0}}}},           # no readings: left out
    ]}
    models = {"rows": [{"id": "t4-llama3-8b", "search": {
        "nbtune": {"attempts": [
            {"seq": 49152, "line": _line(10.95, 2.0, 10.1, 0.4, 9.75)},  # 10.5 measured: +4.3 %, within
            {"seq": 57344, "line": None}]},                              # out of memory: no line
        "unsloth": {"attempts": [{"seq": 32768, "line": _line(5.0, 1.0, 3.0, 0.1, 0.0)}]}}}]}
    paths = []
    for name, doc in (("trainer-1.json", trainer), ("models-2.json", models)):
        (tmp_path / name).write_text(json.dumps(doc))
        paths.append(str(tmp_path / name))
    records = host_check.compare(paths)
    assert [(r["run"], r["row"]) for r in records] == [("trainer-1", "text-2x2048-bf16-packed"),
                                                        ("models-2", "t4-llama3-8b at 49152")]
    first, t4 = records
    assert first["measured_gib"] == pytest.approx(2.55) and first["within"]
    assert t4["error_pct"] == pytest.approx(4.3) and t4["within"] and t4["offloaded_gib"] == 9.75
    assert host_check.main([str(tmp_path / "*.json")]) == 0
    out = capsys.readouterr().out
    assert "| models-2 | t4-llama3-8b at 49152 | 9.75 | 10.95 | 10.50 | +0.45 GiB (+4.3%) | yes |" in out
    assert "2 of 2 within the band, 2 of them offloading." in out
    outside = _line(5.0, 1.0, 3.0, 0.2, 1.0)  # 3.2 measured, 5.0 planned: +56 %
    (tmp_path / "trainer-3.json").write_text(json.dumps({"rows": [{"id": "x", "results": {"nbtune": {"line": outside}}}]}))
    assert not host_check.compare([str(tmp_path / "trainer-3.json")])[0]["within"]
