"""benchmarks/gpu_sampler.py without a GPU: nvidia-smi's lines parsed and summarized per GPU, and
the sampler's process run end to end against a stand-in nvidia-smi on PATH."""
import os
import stat

from bench_scripts import BENCH, load_script

sampler = load_script("gpu_sampler_bench", os.path.join(BENCH, "gpu_sampler.py"))

LINES = [
    # index, sm MHz, W, C, util %, reasons
    "0, 1980, 650.5, 61, 99, 0x0000000000000000",
    "0, 1755, 700.1, 66, 100, 0x0000000000000004",  # power-capped
    "0, 345, 80.0, 40, 0, 0x0000000000000001",  # idle: not a busy sample
    "1, 1980, 640.0, 58, 97, 0x0000000000000000",
    "1, 1980, 655.0, 59, 98, [N/A]",
    "garbage line",
    "1, 1980, 655.0",  # cut short
]


def test_parse_keeps_well_formed_lines_and_reads_the_reason_masks():
    rows = sampler.parse(LINES)
    assert len(rows) == 5
    assert rows[1] == dict(gpu=0, sm_mhz=1755.0, power_w=700.1, temp_c=66.0, util=100.0, reasons=0x4)
    assert rows[4]["reasons"] is None
    assert sampler.reason_names(0x4 | 0x40) == ["sw_power_cap", "hw_thermal"]
    assert sampler.reason_names(0x1) == []  # idle is no slowdown


def test_summary_counts_busy_samples_only():
    s = sampler.summarize(sampler.parse(LINES), interval_ms=200)
    g0, g1 = s[0], s[1]
    assert g0["samples"] == 3 and g0["busy_s"] == 0.4
    assert g0["sm_mhz_median"] == (1980 + 1755) / 2 and g0["sm_mhz_min"] == 1755
    assert g0["power_w_max"] == 700.1 and g0["temp_c_max"] == 66
    assert g0["slowdowns"] == {"sw_power_cap": 0.5}
    assert g1["sm_mhz_min"] == 1980 and g1["slowdowns"] == {} and g1["util_mean_busy"] == 97.5
    assert sampler.summarize([], 200) == {}


def test_sampler_runs_nvidia_smi_and_stops_it(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    # prints one sample per loop until terminated, like nvidia-smi --loop-ms
    fake.write_text("#!/bin/sh\nwhile true; do echo '0, 1980, 650.0, 60, 99, 0x0000000000000000'; sleep 0.02; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with sampler.GpuSampler(str(tmp_path / "gpus.csv"), interval_ms=20) as s:
        import time

        time.sleep(0.3)
    assert s.proc.poll() is not None  # stopped
    summary = s.summary()
    assert summary[0]["samples"] >= 3 and summary[0]["sm_mhz_median"] == 1980


def test_sampler_without_nvidia_smi_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with sampler.GpuSampler(str(tmp_path / "gpus.csv")) as s:
        pass
    assert s.proc is None and s.summary() == {}
