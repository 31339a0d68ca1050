"""benchmarks/multi_gpu.py without a GPU: its data (word rows that the word tokenizer reads back
token for token), its loss-curve and speed arithmetic on real metrics records, and its refusal to
run without 2 GPUs."""
import os
import subprocess
import sys

import pytest
from bench_scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "multi_gpu.py")


@pytest.fixture(scope="module")
def bench():
    return load_script("multi_gpu_bench", SCRIPT)


def test_word_rows_tokenize_to_the_planned_lengths(bench, tmp_path):
    from transformers import AutoTokenizer

    bench.word_tokenizer(str(tmp_path), 1000)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    row = bench.random_rows(1, 1000, 2100)[0]
    ids = tok(row)["input_ids"]
    assert len(ids) == 2100 and tok.unk_token_id not in ids  # truncated to 2048 by max_seq_length
    assert tok.convert_ids_to_tokens(ids[:3]) == row.split()[:3]
    pattern = bench.pattern_rows(3, 1000, (64, 65))
    assert all(len(tok(r)["input_ids"]) == 64 and tok.unk_token_id not in tok(r)["input_ids"] for r in pattern)
    assert bench.pattern_rows(3, 1000, (64, 512)) == bench.pattern_rows(3, 1000, (64, 512))  # seeded


def test_word_view_links_the_weights_and_adds_a_tokenizer(bench, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "tokenizer.json").write_text("{}")
    view = bench.word_view(str(ckpt), 50)
    assert os.path.islink(os.path.join(view, "model.safetensors")) and os.path.islink(os.path.join(view, "config.json"))
    assert not os.path.islink(os.path.join(view, "tokenizer.json"))


def _run(tokens_per_s, losses, elapsed, identical=True, world=1, gc_ms=None):
    recs = [{"event": "start", "step": 0, "world_size": world}]
    for i, (t, l, e) in enumerate(zip(tokens_per_s, losses, elapsed), 1):
        recs.append({"event": "train", "step": i, "loss": l, "tokens_per_s": t, "tokens": 4096 * i, "elapsed_s": e})
        if gc_ms is not None:  # nbtune/train/gc_pause.py's fields
            recs[-1].update(gc_ms=gc_ms[i - 1], gc_full=int(gc_ms[i - 1] > 100))
    recs.append({"event": "end", "step": len(losses), "vram_peak_gib": 7.0})
    if world > 1:
        recs.append({"event": "distributed", "replicas_identical": identical, "devices": ["cuda:0", "cuda:1"],
                     "peak_reserved_gib": [7.1, 7.0]})
    return {"records": recs}


def test_losses_and_speed_arithmetic(bench):
    one = _run([900, 1000, 1000, 1010], [11.0, 10.5, 10.0, 9.5], [1.0, 2.0, 3.0, 4.0], gc_ms=[500.0, 2.0, 450.0, 1.0])
    two = _run([1800, 1950, 1960, 1990], [11.0, 10.52, 10.0, 9.5], [0.5, 1.0, 1.5, 2.0], world=2)
    cmp = bench.compare_losses(one, two)
    assert cmp["ok"] and cmp["same_rows"] and cmp["max_rel_diff"] == pytest.approx(0.02 / 10.5)
    drifted = _run([1800] * 4, [11.0, 12.0, 10.0, 9.5], [0.5, 1.0, 1.5, 2.0], world=2)
    assert not bench.compare_losses(one, drifted)["ok"]
    apart = _run([1800] * 4, [11.0, 10.5, 10.0, 9.5], [0.5, 1.0, 1.5, 2.0], identical=False, world=2)
    assert not bench.compare_losses(one, apart)["ok"]
    s1, s2 = bench.speed(one, warmup=1), bench.speed(two, warmup=1)
    assert s1["tokens_per_s"] == 1000 and s2["tokens_per_s"] == 1960 and s1["timed_steps"] == 3
    assert s1["step_s"] == pytest.approx(1.0) and s2["step_s"] == pytest.approx(0.5)
    assert s1["gc_ms_each"] == [2.0, 450.0, 1.0] and s1["gc_full"] == 1 and s1["gc_ms_per_step"] == 151.0
    assert s2["gc_ms_each"] == [None] * 3 and s2["gc_full"] == 0  # records without the fields
    assert s1["step_s_each"] == [1.0, 1.0, 1.0] and s2["step_s_each"] == [0.5, 0.5, 0.5]
    assert s1["peak_reserved_gib"] == 7.0 and s2["peak_reserved_gib"] == [7.1, 7.0]
    assert s1["offload_each"] is None  # no offload timing in the records
    for i, r in enumerate(train := [r for r in one["records"] if r.get("event") == "train"]):
        r.update(offload_copy_out_n=32, offload_wait_forward_ms=float(i), offload_copy_out_gbps=40.0)
    timed = bench.speed(one, warmup=1)["offload_each"]
    assert [t["wait_forward_ms"] for t in timed] == [1.0, 2.0, 3.0] and timed[0]["copy_out_gbps"] == 40.0
    assert timed[0]["wait_backward_ms"] is None and len(train) == 4


@pytest.mark.skipif(__import__("torch").cuda.device_count() >= 2, reason="checks the refusal without 2 GPUs")
def test_refuses_without_two_gpus(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "needs 2 GPUs" in proc.stderr
    assert not (tmp_path / "multi_gpu.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.device_count() >= 1, reason="checks the refusal without a GPU")
def test_one_gpu_stages_ask_for_one_gpu(tmp_path):
    """The checkpointing stage and a one-GPU profile need one GPU, not two."""
    for stages, extra in (("checkpointing", []), ("profile", ["--profile-worlds", "1"])):
        proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--stages", stages, *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "needs 1 GPUs" in proc.stderr, proc.stderr


def test_checkpointing_stage_compares_plain_and_offload_on_one_gpu(bench, tmp_path, monkeypatch):
    calls, speeds = [], {"plain": iter([1000, 1100, 1050]), "offload": iter([900, 1080, 1000])}

    def fake_finetune(cfg, gpus, name, work, timeout, entry=None, env_extra=None):
        mode = cfg["train"]["gradient_checkpointing"]
        calls.append((gpus, mode, cfg["train"]["grad_accum"]))
        run = _run([next(speeds[mode])] * 3, [11.0, 10.5, 10.0], [1.0, 2.0, 3.0])
        return dict(run, name=name, gpus=gpus, rc=0, seconds=1.0, log_tail=None)

    monkeypatch.setattr(bench, "build_checkpoint", lambda shape, path: None)
    monkeypatch.setattr(bench, "word_view", lambda path, vocab: str(tmp_path / "model"))
    monkeypatch.setattr(bench, "finetune", fake_finetune)
    result = bench.stage_checkpointing(str(tmp_path), str(tmp_path / "ckpt"), steps=2, warmup=1, grad_accum=8,
                                       rounds=3)
    assert [c[1] for c in calls] == ["plain", "offload", "offload", "plain", "plain", "offload"]
    assert {c[0] for c in calls} == {1} and {c[2] for c in calls} == {8}
    assert result["tokens_per_s_per_round"] == {"plain": [1000, 1100, 1050], "offload": [900, 1080, 1000]}
    assert result["median"]["plain"]["tokens_per_s"] == 1050 and result["median"]["offload"]["tokens_per_s"] == 1000
    assert result["vs_first"] == {"plain": 1.0, "offload": pytest.approx(1000 / 1050, abs=1e-3)} and result["ok"]


def test_profile_stage_runs_ddp_profile_with_its_window_at_the_last_boundary(bench, tmp_path, monkeypatch):
    launched = []

    class FakePopen:
        def __init__(self, cmd, env=None, stdout=None, stderr=None, cwd=None, preexec_fn=None):
            launched.append((cmd, env.get("CUDA_VISIBLE_DEVICES")))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(bench, "build_checkpoint", lambda shape, path: None)
    monkeypatch.setattr(bench, "word_view", lambda path, vocab: str(tmp_path / "model"))
    monkeypatch.setattr(bench.subprocess, "Popen", FakePopen)
    out = tmp_path / "out"
    out.mkdir()
    result = bench.stage_profile(str(tmp_path), str(tmp_path / "ckpt"), str(out), one_gpu_grad_accum=8, steps=4)
    assert result["ok"] and result["windows"] == {1: ["--skip", "22", "--active", "4"],
                                                  2: ["--skip", "10", "--active", "4"]}
    (one, one_gpus), (two, two_gpus) = launched
    profile = os.path.join(REPO, "benchmarks", "ddp_profile.py")
    assert one[1:] == [profile, "--out", str(out), "--skip", "22", "--active", "4", one[-1]] and one_gpus == "0"
    assert one[-1].endswith("profile-1gpu.yaml")
    assert "torch.distributed.run" in two and two[two.index(profile):][1:7] == ["--out", str(out), "--skip", "10",
                                                                              "--active", "4"]
    assert two_gpus is None
    launched.clear()
    assert list(bench.stage_profile(str(tmp_path), str(tmp_path / "ckpt"), str(out), worlds=(2,))["windows"]) == [2]
    assert len(launched) == 1
    launched.clear()
    bench.stage_profile(str(tmp_path), str(tmp_path / "ckpt"), str(out), worlds=(2,), repeats=2)
    outs = [cmd[cmd.index("--out") + 1] for cmd, _ in launched]
    assert outs == [str(out / "r1"), str(out / "r2")]  # each repeat into its own folder


def test_throughput_rounds_alternate_and_compare_the_median_runs(bench, tmp_path, monkeypatch):
    order, speeds = [], {1: iter([1000, 1200, 900]), 2: iter([1900, 2100, 2000])}

    def fake_finetune(cfg, gpus, name, work, timeout, entry=None, env_extra=None):
        order.append(gpus)
        tok = next(speeds[gpus])
        run = _run([tok] * 3, [11.0, 10.5, 10.0], [1.0, 2.0, 3.0], world=gpus)
        return dict(run, name=name, gpus=gpus, rc=0, seconds=1.0, log_tail=None)

    monkeypatch.setattr(bench, "build_checkpoint", lambda shape, path: None)
    monkeypatch.setattr(bench, "word_view", lambda path, vocab: str(tmp_path / "model"))
    monkeypatch.setattr(bench, "finetune", fake_finetune)
    result = bench.stage_throughput(str(tmp_path), str(tmp_path / "ckpt"), steps=2, warmup=1, one_gpu_grad_accum=8,
                                    checkpointing="plain", rounds=3)
    assert order == [1, 2, 2, 1, 1, 2]
    assert result["tokens_per_s_per_round"] == [[1000, 1200, 900], [1900, 2100, 2000]]
    assert result["one_gpu"]["tokens_per_s"] == 1000 and result["two_gpus"]["tokens_per_s"] == 2000
    assert result["speedup"] == 2.0 and result["ok"] and len(result["runs"]) == 6
    assert result["losses"]["ok"]


def test_contention_stage_runs_solo_then_pairs_with_and_without_their_own_cpus(bench, tmp_path, monkeypatch):
    started, speeds = [], iter([1000, 980, 1010, 1000, 1000])

    def fake_start(cfg, gpus, name, work, entry=None, gpu=0, cpus=None, env_extra=None):
        started.append((name, gpu, cpus))
        return dict(name=name, gpus=gpus)

    def fake_finish(job, timeout):
        run = _run([next(speeds)] * 3, [11.0, 10.5, 10.0], [1.0, 2.0, 3.0])
        return dict(run, name=job["name"], gpus=1, rc=0, seconds=1.0, log_tail=None)

    monkeypatch.setattr(bench, "build_checkpoint", lambda shape, path: None)
    monkeypatch.setattr(bench, "word_view", lambda path, vocab: str(tmp_path / "model"))
    monkeypatch.setattr(bench, "start_finetune", fake_start)
    monkeypatch.setattr(bench, "finish_finetune", fake_finish)
    monkeypatch.setattr(bench, "finetune", lambda cfg, gpus, name, work, timeout, **kw: fake_finish(
        fake_start(cfg, gpus, name, work, **kw), timeout))
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {3, 0, 2, 1})
    result = bench.stage_contention(str(tmp_path), str(tmp_path / "ckpt"), steps=2, warmup=1)
    assert [(n, g) for n, g, _ in started] == [("solo", 0), ("pair-gpu0", 0), ("pair-gpu1", 1),
                                               ("pair-pinned-gpu0", 0), ("pair-pinned-gpu1", 1)]
    assert [c for _, _, c in started] == [None, None, None, [0, 1], [2, 3]]  # own halves of the CPUs
    assert result["tokens_per_s"] == {"solo": [1000], "pair": [980, 1010], "pair-pinned": [1000, 1000]}
    assert result["vs_solo"] == {"pair": [0.98, 1.01], "pair-pinned": [1.0, 1.0]} and result["ok"]
    assert result["topology"]["allowed_cpus"] == 4 and result["pinned_cpus"] == [[0, 1], [2, 3]]
