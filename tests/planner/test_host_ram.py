"""The planner's second budget, host RAM: its terms, the platform profiles, the verdicts and the
suggestions (which never propose what the host cannot hold), partial offload, and reading the
machine's RAM from /proc/meminfo and cgroup v1/v2 files (fixtures here). CPU, no torch needed."""
from __future__ import annotations

import json

import pytest

from nbtune.planner import PlannerError, plan, resolve_gpu
from nbtune.planner import host as host_mod
from nbtune.planner import host_memory, memory
from nbtune.planner.gpus import PROFILES, gpu_names
from nbtune.planner.host_memory import HOST_TERMS, pool_bytes
from nbtune.planner.memory import DEFAULT_COEFFICIENTS, GiB

C = DEFAULT_COEFFICIENTS


def _plan(model="llama-3.1-8b", **kw):
    kw.setdefault("coefficients", C)
    return plan(model, **kw)


# ----------------------------------------------------------------------------- profiles
def test_profiles_carry_host_ram_and_bare_gpus_do_not():
    assert {"colab-t4", "kaggle-t4x2", "kaggle-p100", "colab-l4", "colab-a100"} <= set(PROFILES)
    assert set(PROFILES) <= set(gpu_names()) and "T4" in gpu_names()
    colab = resolve_gpu("colab-t4")
    assert colab.card == "T4" and colab.total_gib == resolve_gpu("T4").total_gib
    assert colab.host_ram_gib == pytest.approx(12.67) and colab.host_budget_gib < colab.host_ram_gib
    assert resolve_gpu("Colab T4") is colab and resolve_gpu("colab_t4") is colab
    assert resolve_gpu("kaggle-t4x2").gpu_count == 2 and resolve_gpu("kaggle-p100").card == "P100"
    assert not resolve_gpu("kaggle-p100").bf16
    t4 = resolve_gpu("T4")
    assert t4.host_ram_gib is None and not t4.host_known and t4.host_budget_gib is None
    assert "host RAM 12.67 GiB" in colab.describe() and "host RAM" not in t4.describe()
    with pytest.raises(PlannerError, match="colab-t4"):
        resolve_gpu("colab-t5")


def test_a_bare_gpu_leaves_host_ram_unjudged_unless_given():
    p = _plan(gpu="T4", seq_len=49152, batch_size=1, gradient_checkpointing="offload")
    assert p.host_fits is None and p.host_capacity_gib is None and p.fits == p.gpu_fits
    assert p.host_peak_gib > 12  # still estimated and shown
    text = repr(p)
    assert "peak in host RAM" in text and "NOT CHECKED (host RAM unknown)" in text and "colab-t4" in text
    given = _plan(gpu="T4", seq_len=49152, batch_size=1, gradient_checkpointing="offload", host_ram_gib=12.7)
    assert given.host_fits is False and given.gpu.host_source == "given"
    with pytest.raises(PlannerError, match="host_ram_gib"):
        _plan(gpu="T4", host_ram_gib="plenty")
    with pytest.raises(PlannerError, match="host_ram_gib must be a positive number"):
        _plan(gpu="T4", host_ram_gib=-1)


# ----------------------------------------------------------------------------- terms and verdicts
def test_llama3_8b_at_49152_tokens_on_colab_t4_does_not_fit_the_host_with_full_offload():
    p = _plan(gpu="colab-t4", seq_len=49152, batch_size=1, gradient_checkpointing="offload")
    terms = p.host_breakdown
    assert list(terms) == list(HOST_TERMS)
    assert terms["offloaded activations"] == pytest.approx(32 * 49152 * 4096 * 2 / GiB) == pytest.approx(12.0)
    assert terms["process baseline"] == pytest.approx(C.host_baseline_gib)
    # 384 MiB buffers, each a slab of exactly its size: nothing rounded up
    assert terms["offload pool rounding"] == pytest.approx(0.0)
    training = sum(terms[t] for t in host_memory.TRAINING_TERMS)
    assert p.host_peak_gib == pytest.approx(terms["process baseline"] + max(training, terms["model loading (transient)"]))
    assert p.host_peak_gib == pytest.approx(C.host_baseline_gib + C.host_dataset_default_gib + 12.0)
    assert p.host_fits is False and not p.fits and f"host RAM short by {-p.host_margin_gib:.2f} GiB" in p.verdict()
    text = repr(p)
    assert f"{p.host_peak_gib:.2f} GiB of {p.host_capacity_gib:.2f} GiB" in text
    assert "offloaded layer inputs (32 of 32 layers)" in text and "host RAM:" in text
    assert f"-> {p.host_verdict()}" in text and p.host_verdict().startswith("DOES NOT FIT (short by")
    d = p.to_dict()
    assert d["host_fits"] is False and d["host_peak_gib"] == pytest.approx(p.host_peak_gib) and not d["fits"]
    assert "peak in host RAM" in p._repr_html_()
    # the smallest change: offload only what the host holds, and a context the GPU then holds
    s = p.suggest()
    assert s.fits and s.changes["gradient_checkpointing"] == "auto" and s.changes["seq_len"] < 49152
    assert 0 < s.plan.offloaded_layers < 32 and s.plan.host_fits and s.plan.gpu_fits
    assert "host RAM" in s.message and "layers;" in s.message


def test_a_run_the_gpu_holds_and_the_host_does_not():
    p = _plan(gpu="colab-t4", seq_len=40960, batch_size=1, gradient_checkpointing="offload")
    assert p.gpu_fits and p.host_fits is False and not p.fits
    assert p.verdict() == f"DOES NOT FIT IN HOST RAM (short by {-p.host_margin_gib:.2f} GiB)"
    assert f"verdict: {p.verdict()}" in repr(p)
    tight = _plan(gpu="colab-t4", seq_len=32768, batch_size=1, gradient_checkpointing="offload")
    assert 0 <= tight.host_margin_gib < tight.host_required_margin_gib and not tight.fits
    assert tight.verdict().startswith("TOO TIGHT IN HOST RAM (only")
    ok = _plan(gpu="colab-t4", seq_len=2048, batch_size=1)
    assert ok.fits and ok.verdict().endswith(f"on the GPU, {ok.host_margin_gib:.2f} GiB of host RAM)")


def test_auto_offloads_only_the_layers_the_host_holds():
    p = _plan(gpu="colab-t4", seq_len=49152, batch_size=1)
    n = p.offloaded_layers
    assert p.checkpointing_auto and p.settings.gradient_checkpointing == "offload" and 0 < n < 32
    assert p.settings.offload_layers == n and p.host_fits
    assert f"host RAM holds only {n} of 32 layer inputs" in p.checkpointing_reason
    assert f"({n} of 32 layers; {32 - n} plain)" in p.settings_line()
    # the largest that fits: one more layer does not
    more = _plan(gpu="colab-t4", seq_len=49152, batch_size=1, gradient_checkpointing="offload", offload_layers=n + 1)
    assert more.host_fits is False
    # the GPU holds the plain layers' inputs: more than with every layer offloaded
    full = _plan(gpu="colab-t4", seq_len=49152, batch_size=1, gradient_checkpointing="offload")
    gap = p.breakdown["activations"] - full.breakdown["activations"]
    assert gap == pytest.approx(C.act_scale * (32 - n) * 49152 * 4096 * 2 / GiB)
    assert p.estimate.details["checkpoint_inputs_on_gpu"] == 32 - n + 3


def test_partial_offload_sits_between_plain_and_full_offload_on_the_gpu():
    kw = dict(gpu="T4", seq_len=8192, batch_size=1, coefficients=C)
    full = plan("llama-3.1-8b", gradient_checkpointing="offload", **kw)
    plain = plan("llama-3.1-8b", gradient_checkpointing="plain", **kw)
    none = plan("llama-3.1-8b", gradient_checkpointing="offload", offload_layers=0, **kw)
    half = plan("llama-3.1-8b", gradient_checkpointing="offload", offload_layers=16, **kw)
    assert none.breakdown["activations"] == pytest.approx(plain.breakdown["activations"])
    assert full.breakdown["activations"] < half.breakdown["activations"] < plain.breakdown["activations"]
    per_layer = C.act_scale * 8192 * 4096 * 2 / GiB
    assert half.breakdown["activations"] - full.breakdown["activations"] == pytest.approx(16 * per_layer)
    assert none.host_breakdown["offloaded activations"] == 0 and half.host_breakdown["offloaded activations"] == \
        pytest.approx(16 * 8192 * 4096 * 2 / GiB)
    assert plan("llama-3.1-8b", gradient_checkpointing="offload", offload_layers=99, **kw).offloaded_layers == 32
    # a config has no layer count: a partial offload is written as "auto", a full one as "offload"
    assert half.to_config()["train"]["gradient_checkpointing"] == "auto"
    assert full.to_config()["train"]["gradient_checkpointing"] == "offload"
    with pytest.raises(PlannerError, match="offload_layers must be a whole number"):
        plan("llama-3.1-8b", gradient_checkpointing="offload", offload_layers=-2, **kw)


def test_host_terms_follow_their_inputs():
    base = _plan(gpu="colab-l4", seq_len=2048, batch_size=2)
    rows = _plan(gpu="colab-l4", seq_len=2048, batch_size=2, data_rows=100_000, data_tokens_per_row=512)
    assert rows.host_breakdown["dataset + tokenization"] == pytest.approx(
        100_000 * 512 * C.host_bytes_per_data_token / GiB)
    assert base.host_breakdown["dataset + tokenization"] == pytest.approx(C.host_dataset_default_gib)
    capped = _plan(gpu="colab-l4", seq_len=256, batch_size=2, data_rows=1000, data_tokens_per_row=4096)
    assert capped.host_breakdown["dataset + tokenization"] == pytest.approx(1000 * 256 * C.host_bytes_per_data_token / GiB)
    paged = _plan(gpu="colab-l4", optimizer="paged_adamw_8bit")
    assert base.host_breakdown["paged optimizer"] == 0
    assert paged.host_breakdown["paged optimizer"] == pytest.approx(paged.lora_params * memory.ADAM8_BYTES_PER_PARAM / GiB)
    # a pre-quantized checkpoint is smaller than a shard: the loading transient is the checkpoint
    import dataclasses

    from nbtune.planner import resolve_shape

    shape = resolve_shape("llama-3.2-3b")
    pre = _plan(dataclasses.replace(shape, prequantized=True), gpu="colab-l4")
    full = _plan(shape, gpu="colab-l4")
    embedding = shape.vocab_size * shape.hidden_size * 2  # the largest tensor, cast while loading
    assert host_memory.checkpoint_bytes(shape, True) < C.host_load_shard_gib * GiB < host_memory.checkpoint_bytes(
        shape, False)
    assert pre.host_breakdown["model loading (transient)"] == pytest.approx(
        (host_memory.checkpoint_bytes(shape, True) + embedding) / GiB)
    assert full.host_breakdown["model loading (transient)"] == pytest.approx(C.host_load_shard_gib + embedding / GiB)
    small = _plan("smollm2-135m", gpu="colab-t4")
    assert small.host_breakdown["model loading (transient)"] < 1.0  # the whole checkpoint, below a shard
    # data parallel: every process on the host holds its own
    two = _plan(gpu="kaggle-t4x2", seq_len=2048, batch_size=1, world_size=2)
    assert two.host_peak_gib == pytest.approx(2 * two.host_process_peak_gib)
    assert "(2 processes)" in repr(two)
    assert any("world_size=2" in n for n in _plan(gpu="kaggle-t4x2").notes)


def test_pool_bytes_follows_the_slab_rule():
    assert pool_bytes(0, 10**6) == 0 and pool_bytes(3, 0) == 0
    mib = 2**20
    # a llama3-8b layer input at 49,152 tokens (384 MiB): a slab each, nothing rounded up
    assert pool_bytes(5, 384 * mib) == 5 * 384 * mib and pool_bytes(25, 384 * mib) == 25 * 384 * mib
    # 3 MiB: one to a 4 MiB slab; 1 MiB: four
    assert pool_bytes(3, 3 * mib) == 9 * mib and pool_bytes(5, mib) == 8 * mib
    # small buffers: aligned to 512 bytes (1000 -> 1024), 4096 to a 4 MiB slab
    assert pool_bytes(1, 1000) == 4 * mib and pool_bytes(4097, 1000) == 8 * mib


def test_the_process_baseline_comes_from_its_measurement(tmp_path):
    data = json.loads(memory.CALIBRATION_FILE.read_text(encoding="utf-8"))
    measured_here = data["host"]["process_baseline_gib"]
    assert isinstance(measured_here, float) and 0.5 < measured_here < memory.DEFAULT_COEFFICIENTS.host_baseline_gib
    assert data["host"]["date"] and data["host"]["platform"] and data["host"]["how"]
    assert memory.coefficients().host_baseline_gib == measured_here
    assert f"host: process baseline measured ({data['host']['date']}" in repr(plan("llama-3.1-8b", gpu="colab-t4"))
    unmeasured = tmp_path / "unmeasured.json"
    unmeasured.write_text(json.dumps({**data, "host": {**data["host"], "process_baseline_gib": None}}), encoding="utf-8")
    c = memory.coefficients(unmeasured)
    assert c.host_baseline_gib == memory.DEFAULT_COEFFICIENTS.host_baseline_gib and "to be calibrated" in c.host_source
    measured = tmp_path / "calibration.json"
    measured.write_text(json.dumps({"host": {"process_baseline_gib": 2.4, "date": "2027-01-02",
                                             "platform": "colab-t4"}}), encoding="utf-8")
    c = memory.coefficients(measured)
    assert c.host_baseline_gib == 2.4 and "measured (2027-01-02, colab-t4)" in c.host_source
    both = tmp_path / "both.json"
    both.write_text(json.dumps({**data, "host": {"process_baseline_gib": 2.6}}), encoding="utf-8")
    c = memory.coefficients(both)
    assert c.host_baseline_gib == 2.6 and c.act_scale == memory.coefficients().act_scale


# ----------------------------------------------------------------------------- suggestions
@pytest.mark.parametrize("model, seq_len", [("llama-3.1-8b", 2048), ("llama-3.1-8b", 8192), ("qwen2.5-7b", 4096),
                                            ("llama-3.2-1b", 16384)])
@pytest.mark.parametrize("checkpointing", ["auto", "offload"])
def test_suggestions_never_exceed_the_host(model, seq_len, checkpointing):
    p = _plan(model, gpu="colab-t4", seq_len=seq_len, batch_size=1, gradient_checkpointing=checkpointing)
    s = p.suggest()
    if s.plan is None:
        return
    assert s.plan.host_fits and s.plan.gpu_fits
    top = s.plan.replace(batch_size=s.max_batch_size)
    assert top.host_fits and top.gpu_fits
    assert not s.plan.replace(batch_size=s.max_batch_size + 1).fits
    longest = s.plan.replace(seq_len=s.max_seq_len)
    assert longest.host_fits and longest.gpu_fits


def test_suggest_on_colab_t4_proposes_less_than_the_bare_t4():
    t4 = _plan(gpu="T4", seq_len=2048, batch_size=2).suggest()
    colab = _plan(gpu="colab-t4", seq_len=2048, batch_size=2).suggest()
    assert colab.max_batch_size < t4.max_batch_size
    assert "both budgets" in colab.message and "host RAM" in colab.message
    # and a run that needs the larger sibling is sent to a platform, with its RAM
    big = _plan("qwen2.5-14b", gpu="colab-t4", seq_len=16384, batch_size=4, load_in_4bit=False).suggest()
    if big.changes.get("gpu"):
        assert big.changes["gpu"] in PROFILES


def test_cli_states_the_host_figure_and_a_verdict(capsys):
    from nbtune.ui.cli import main

    assert main(["plan", "llama-3.1-8b", "--gpu", "colab-t4", "--seq-len", "49152"]) == 0
    out = capsys.readouterr().out
    assert "peak in host RAM" in out and "GiB of 11.97 GiB" in out and "verdict:" in out
    assert "Smallest change that fits" in out
    assert main(["plan", "llama-3.1-8b", "--gpu", "colab-t4", "--seq-len", "57344", "--batch-size", "1",
                 "--checkpointing", "offload"]) == 0
    out = capsys.readouterr().out
    full = plan("llama-3.1-8b", gpu="colab-t4", seq_len=57344, batch_size=1, gradient_checkpointing="offload")
    assert full.host_peak_gib > 14.0  # 32 layer inputs of 448 MiB
    assert "DOES NOT FIT IN HOST RAM" in out and f"{full.host_peak_gib:.2f} GiB of 11.97 GiB" in out
    assert main(["plan", "llama-3.1-8b", "--gpu", "T4", "--host-ram", "12.67", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["host_ram_gib"] == 12.67 and data["host_fits"] in (True, False) and "host_breakdown_gib" in data
    assert main(["plan", "llama-3.1-8b", "--gpu", "colab-t4", "--suggest"]) == 0
    out = capsys.readouterr().out
    batch = int(out.split("Largest batch size at seq_len 2048: ")[1].split(";")[0])
    assert 1 <= batch < 33
    assert _plan(gpu="colab-t4", batch_size=batch, coefficients=memory.coefficients()).host_fits
    assert main(["plan", "llama-3.1-8b", "--host-ram", "lots"]) == 2
    assert "--host-ram 'lots'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the machine's RAM
MEMINFO = """MemTotal:       13290452 kB
MemFree:         9000000 kB
MemAvailable:   12000000 kB
Buffers:          100000 kB
HugePages_Total:       0
"""


def _files(tmp_path, meminfo=MEMINFO, cgroup="0::/\n", rss_kb=1_048_576):
    (tmp_path / "meminfo").write_text(meminfo)
    (tmp_path / "cgroup").write_text(cgroup)
    (tmp_path / "status").write_text(f"Name:\tpython\nVmRSS:\t{rss_kb} kB\nThreads:\t4\n")
    root = tmp_path / "sys"
    root.mkdir()
    return dict(meminfo=tmp_path / "meminfo", cgroup_root=root, proc_cgroup=tmp_path / "cgroup",
                status=tmp_path / "status"), root


def test_meminfo_alone(tmp_path):
    paths, _ = _files(tmp_path)
    info = host_mod.read_meminfo(paths["meminfo"])
    assert info["MemTotal"] == 13290452 * 1024 and info["HugePages_Total"] == 0
    h = host_mod.detect_host(**paths)
    assert h.total_gib == pytest.approx(13290452 / 2**20, abs=1e-3)
    # others hold total - available - this process (1 GiB)
    assert h.other_gib == pytest.approx((13290452 - 12000000) / 2**20 - 1.0, abs=1e-3)
    assert h.process_gib == pytest.approx(1.0) and "/proc/meminfo" in h.source


def test_cgroup_v2_limit_below_memtotal(tmp_path):
    paths, root = _files(tmp_path, cgroup="0::/kubepods/pod1\n")
    cg = root / "kubepods" / "pod1"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text(f"{8 * GiB}\n")
    (cg / "memory.current").write_text(f"{3 * GiB}\n")
    # a checkpoint just read sits in the file cache, active and inactive: reclaimable, not used
    (cg / "memory.stat").write_text(f"anon {2 * GiB}\nfile {GiB}\nactive_file {GiB // 4}\n"
                                    f"inactive_file {GiB // 2}\n")
    assert host_mod.read_cgroup_memory(root, paths["proc_cgroup"]) == (8 * GiB, 3 * GiB - 3 * GiB // 4)
    h = host_mod.detect_host(**paths)
    assert h.total_gib == 8.0 and "cgroup memory limit" in h.source
    # available: the cgroup's 5.75 GiB (less than MemAvailable); others: 8 - 5.75 - 1 (this process)
    assert h.other_gib == pytest.approx(1.25) and h.budget_gib == pytest.approx(6.75)


def test_cgroup_v2_without_a_limit_and_at_the_mount_root(tmp_path):
    paths, root = _files(tmp_path, cgroup="0::/\n")
    (root / "memory.max").write_text("max\n")
    assert host_mod.read_cgroup_memory(root, paths["proc_cgroup"]) == (None, None)
    assert host_mod.detect_host(**paths).total_gib == pytest.approx(13290452 / 2**20, abs=1e-3)
    (root / "memory.max").write_text(f"{4 * GiB}\n")  # a container sees its own cgroup at the root
    (root / "memory.current").write_text(f"{GiB}\n")
    assert host_mod.read_cgroup_memory(root, paths["proc_cgroup"]) == (4 * GiB, GiB)


def test_cgroup_v1(tmp_path):
    paths, root = _files(tmp_path, cgroup="12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n")
    cg = root / "memory" / "docker" / "abc"
    cg.mkdir(parents=True)
    (cg / "memory.limit_in_bytes").write_text(f"{6 * GiB}\n")
    (cg / "memory.usage_in_bytes").write_text(f"{2 * GiB}\n")
    (cg / "memory.stat").write_text(f"cache {GiB}\ntotal_active_file {GiB // 4}\ntotal_inactive_file {GiB // 4}\n")
    assert host_mod.read_cgroup_memory(root, paths["proc_cgroup"]) == (6 * GiB, 2 * GiB - GiB // 2)
    h = host_mod.detect_host(**paths)
    assert h.total_gib == 6.0 and h.other_gib == pytest.approx(6 - 4.5 - 1.0)
    # v1's "no limit" is a page-rounded LONG_MAX
    (cg / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert host_mod.read_cgroup_memory(root, paths["proc_cgroup"]) == (None, None)


def test_the_process_counts_the_memory_it_owns_not_the_files_it_maps(tmp_path):
    """VmRSS counts the file pages a process maps (a memory-mapped checkpoint: 14 GiB for an 8B model
    while it loads); the kernel reclaims those, so the process's own figure is RssAnon + RssShmem."""
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t16777216 kB\nRssAnon:\t1048576 kB\nRssFile:\t15204352 kB\n"
                      "RssShmem:\t524288 kB\n")
    assert host_mod.read_owned_memory(status) == int(1.5 * GiB)
    machine = tmp_path / "machine"
    machine.mkdir()
    paths, _ = _files(machine)
    h = host_mod.detect_host(**{**paths, "status": status})
    assert h.process_gib == pytest.approx(1.5)


def test_no_meminfo_no_host(tmp_path):
    assert host_mod.detect_host(meminfo=tmp_path / "missing") is None
    assert host_mod.read_owned_memory(tmp_path / "missing") is None


def test_auto_takes_the_machines_ram_or_nbtune_host_ram(monkeypatch):
    monkeypatch.setenv("NBTUNE_GPU", "T4")
    monkeypatch.setenv("NBTUNE_HOST_RAM", "12.7")
    g = resolve_gpu("auto")
    assert g.name == "T4" and g.host_ram_gib == 12.7 and "NBTUNE_HOST_RAM" in g.host_source
    monkeypatch.setenv("NBTUNE_HOST_RAM", "off")
    assert resolve_gpu("auto").host_ram_gib is None
    monkeypatch.setenv("NBTUNE_HOST_RAM", "auto")  # measured here (this is Linux)
    measured = resolve_gpu("auto")
    assert measured.host_ram_gib > 0 and "measured here" in measured.host_source
    assert measured.host_process_gib is not None and measured.host_process_gib > 0
    monkeypatch.setenv("NBTUNE_HOST_RAM", "lots")
    with pytest.raises(PlannerError, match="NBTUNE_HOST_RAM"):
        resolve_gpu("auto")
    monkeypatch.setenv("NBTUNE_GPU", "colab-t4")  # a profile brings its own RAM: emulated too
    monkeypatch.setenv("NBTUNE_HOST_RAM", "64")
    assert resolve_gpu("auto").host_ram_gib == pytest.approx(12.67)
