"""benchmarks/models.py without a GPU: row selection, the first-loss check, ratios and targets, the
markdown, and the driver end to end with stand-in peer scripts (a missing peer, an OOM line, a
crash, a hung process, the time budget)."""
import json
import os
import subprocess
import textwrap

import pytest

from bench_scripts import REPO, load_script

models = load_script("nbtune_bench_models", os.path.join(REPO, "benchmarks", "models.py"))


# ------------------------------------------------------------------------------------------------
# rows, peers, arguments
# ------------------------------------------------------------------------------------------------
def test_main_rows_are_the_issue_rows():
    rows = models.select_rows("main")
    assert [(r.shape, r.batch, r.seq, r.dtype) for r in rows] == [
        ("llama3-8b", 2, 2048, "bfloat16"), ("llama3-8b", 1, 2048, "float16"), ("llama3-8b", 1, 8192, "bfloat16"),
        ("llama3-8b", 1, 16384, "bfloat16"), ("llama2-7b", 2, 2048, "bfloat16"), ("llama2-7b", 1, 2048, "float16")]
    assert [r.spec for r in rows][0] == "llama3-8b:2:2048:bfloat16"
    t4 = models.select_rows("t4")
    assert [(r.kind, r.shape, r.dtype, r.batch) for r in t4] == [("t4", "llama3-8b", "float16", 1)]
    assert [r.id for r in models.select_rows("all")] == models.MAIN_ROWS + models.T4_ROWS


def test_row_selection_globs_custom_shapes_and_dedup():
    rows = models.select_rows("llama2*, mistral-7b-1x4096-bf16, llama2-7b-2x2048-bf16,t4-qwen2.5-7b")
    assert [r.id for r in rows] == ["llama2-7b-2x2048-bf16", "llama2-7b-1x2048-fp16", "mistral-7b-1x4096-bf16",
                                    "t4-qwen2.5-7b"]
    assert models.parse_row("gemma-2-9b-2x1024-float16").id == "gemma-2-9b-2x1024-fp16"
    for bad in ("nope", "llama9-1x2048-bf16", "llama3-8b-1x2048-fp8", "t4-nope", "zzz*"):
        with pytest.raises(ValueError):
            models.select_rows(bad)


def test_peers_and_arguments():
    assert models.parse_peers("nbtune,hf,unsloth,nbtune") == ["nbtune", "hf", "unsloth"]
    with pytest.raises(ValueError):
        models.parse_peers("nbtune,liger")
    args = models.build_parser().parse_args([])
    assert (args.rows, args.peers, args.time_budget, args.t4_cap_gib, args.t4_sdpa) == (
        "all", "hf,unsloth,nbtune", 0, 14.3, "efficient")
    assert [int(c) for c in args.t4_contexts.split(",")][:5] == [32768, 40960, 49152, 57344, 65536]
    args = models.build_parser().parse_args(["--rows", "t4", "--peers", "nbtune", "--time-budget", "500",
                                             "--t4-steps", "1:2", "--row-timeout", "90"])
    assert (args.time_budget, args.t4_steps, args.row_timeout) == (500, (1, 2), 90)
    with pytest.raises(SystemExit):
        models.build_parser().parse_args(["--t4-steps", "3"])
    assert models.main(["--rows", "nope"]) == 2


def test_list_and_dry_run_print_the_plan(capsys):
    assert models.main(["--dry-run", "--rows", "llama2-7b-1x2048-fp16,t4", "--peers", "nbtune,unsloth"]) == 0
    out = capsys.readouterr().out
    assert "llama2-7b:1:2048:float16" in out and "MEM_CAP_GIB=14.3" in out and "NBTUNE_BENCH_SDPA=efficient" in out


# ------------------------------------------------------------------------------------------------
# first loss, ratios, targets (synthetic peer lines)
# ------------------------------------------------------------------------------------------------
def line(peer, tps, gib, loss=None, exact=None, **kw):
    out = dict(peer=peer, tokens_per_s=tps, peak_reserved_gib=gib, **kw)
    if loss is not None:
        out["first_loss"] = loss
    if exact is not None:
        out["first_loss_exact"] = exact
    return out


def job(status="ok", ln=None):
    return dict(status=status, line=ln)


def test_first_loss_matches_within_1e_3_absolute():
    res = {"hf": job(ln=line("hf-peft-bnb", 2782, 19.62, 11.9, 11.90012)),
           "nbtune": job(ln=line("nbtune-0.1.0", 12000, 6.5, 11.901, 11.90090))}
    check = models.first_loss_check(res, "llama3-8b", 2048)
    assert check["status"] == "ok" and check["reference"] == "hf" and check["diff"] == pytest.approx(7.8e-4)
    res["nbtune"]["line"]["first_loss_exact"] = 11.90250
    check = models.first_loss_check(res, "llama3-8b", 2048)
    assert check["status"] == "mismatch" and check["diff"] == pytest.approx(2.38e-3)
    assert models.row_status(res, check) == "failed"


def test_first_loss_rounded_values_get_rounding_slack():
    # the original peers print only round(loss, 3): 11.762 vs 11.763 may be 1e-4 apart in truth
    res = {"hf": job(ln=line("hf-peft-bnb", 1, 1, 11.762)), "nbtune": job(ln=line("nbtune", 1, 1, 11.763))}
    assert models.first_loss_check(res, "llama3-8b", 2048)["status"] == "ok"
    res["nbtune"]["line"]["first_loss"] = 11.765
    check = models.first_loss_check(res, "llama3-8b", 2048)
    assert check["status"] == "mismatch" and check["tol"] == pytest.approx(2e-3)


def test_first_loss_falls_back_to_unsloth_only_within_checkpoint_positions():
    un = job(ln=line("unsloth-2026.10.9", 8411, 10.44, 11.8, 11.8001))
    nb = job(ln=line("nbtune", 9000, 9.0, 11.8, 11.8004))
    hf_oom = job("oom", dict(peer="hf-peft-bnb", error="OOM"))
    check = models.first_loss_check({"hf": hf_oom, "unsloth": un, "nbtune": nb}, "llama3-8b", 8192)
    assert check["status"] == "ok" and check["reference"] == "unsloth"
    check = models.first_loss_check({"hf": hf_oom, "unsloth": un, "nbtune": nb}, "llama3-8b", 16384)
    assert check["status"] == "unchecked" and "RoPE" in check["reason"]
    assert models.row_status({"hf": hf_oom, "unsloth": un, "nbtune": nb}, check) == "ok"
    check = models.first_loss_check({"hf": job(ln=line("hf", 1, 1, 11.8, 11.8)), "nbtune": job("oom", None)},
                                    "llama3-8b", 2048)
    assert check["status"] == "n/a"


def test_unsloth_vs_hf_is_recorded():
    res = {"hf": job(ln=line("hf", 1, 1, exact=11.9000)), "unsloth": job(ln=line("u", 1, 1, exact=11.9003)),
           "nbtune": job(ln=line("n", 1, 1, exact=11.9001))}
    check = models.first_loss_check(res, "llama2-7b", 2048)
    assert check["unsloth_vs_hf"] == pytest.approx(3e-4) and check["status"] == "ok"


def test_ratios_and_targets():
    res = {"hf": job(ln=line("hf", 2782, 19.62)), "unsloth": job(ln=line("u", 10256, 6.95)),
           "nbtune": job(ln=line("n", 11500, 6.5))}
    r = models.ratios(res)
    assert r["speed_vs_unsloth"] == pytest.approx(11500 / 10256, abs=1e-3)
    assert r["memory_vs_unsloth"] == pytest.approx(6.5 / 6.95, abs=1e-3)
    assert r["speed_vs_hf"] == pytest.approx(11500 / 2782, abs=1e-3)
    assert r["memory_vs_hf"] == pytest.approx(6.5 / 19.62, abs=1e-3)
    assert (r["speed_target"], r["memory_target"]) == ("met", "met")
    res["nbtune"] = job(ln=line("n", 11200, 6.7))  # 1.092x and 0.964x: both just short
    r = models.ratios(res)
    assert (r["speed_target"], r["memory_target"]) == ("not met", "not met")
    r = models.ratios({"hf": job(ln=line("hf", 2782, 19.62)), "unsloth": job("skipped"), "nbtune": job(ln=line("n", 5000, 6))})
    assert r["speed_vs_unsloth"] is None and r["speed_target"] is None and r["speed_vs_hf"] == pytest.approx(1.797, abs=1e-3)


def test_t4_summary_longest_and_first_oom():
    attempts = [dict(seq=32768, status="ok", line=line("n", 6500, 14.2)),
                dict(seq=40960, status="ok", line=line("n", 6400, 14.25)),
                dict(seq=49152, status="oom", line=dict(error="OOM"))]
    s = models.t4_summary(attempts)
    assert s == dict(longest=40960, first_oom=49152, stopped="first OOM", tokens_per_s=6400, peak_reserved_gib=14.25)
    assert models.t4_summary([dict(seq=32768, status="oom", line=None)])["longest"] is None
    assert models.t4_summary([dict(seq=32768, status="not_reached", line=None)])["stopped"] == "not_reached"


# ------------------------------------------------------------------------------------------------
# classifying a peer process
# ------------------------------------------------------------------------------------------------
def test_parse_output_and_classify():
    out = "Unsloth: banner\n{not json\n" + json.dumps(line("hf-peft-bnb", 4086, 10.24, 10.4)) + "\n[1, 2]\n"
    err = "warning\n# bench-sdpa {\"backend\": \"efficient\", \"calls\": 64}\n"
    lines, sdpa = models.parse_output(out, err)
    assert len(lines) == 1 and sdpa == {"backend": "efficient", "calls": 64}
    j = models.Job("r", "hf", "s")
    models.classify(j, 0, lines, err, False)
    assert j.status == "ok" and j.line["tokens_per_s"] == 4086

    oom_line = dict(peer="unsloth", shape="llama3-8b", batch="1", seqlen="40960", dtype="float16", cap_gib=14.3, error="OOM")
    j = models.Job("r", "unsloth", "s")
    models.classify(j, 0, [oom_line], "", False)
    assert j.status == "oom"

    j = models.Job("r", "nbtune", "s")
    models.classify(j, 1, [], "Traceback...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n", False)
    assert j.status == "oom" and "Tried to allocate" in j.detail

    j = models.Job("r", "nbtune", "s")
    models.classify(j, 1, [], "Traceback (most recent call last):\n  File x\nAssertionError: gradient checkpointing is not active\n", False)
    assert j.status == "error" and "AssertionError" in j.detail

    j = models.Job("r", "nbtune", "s", seconds=30)
    models.classify(j, -15, [], "", True)
    assert j.status == "timeout"


# ------------------------------------------------------------------------------------------------
# the markdown
# ------------------------------------------------------------------------------------------------
def speed_rec(row_id, results, **extra):
    row = models.parse_row(row_id)
    rec = dict(id=row.id, kind="speed", shape=row.shape, batch=row.batch, seq=row.seq, dtype=row.dtype,
               label=row.label(), results=results, **extra)
    rec["first_loss"] = models.first_loss_check(results, row.shape, row.seq)
    rec["ratios"] = models.ratios(results)
    rec["status"] = models.row_status(results, rec["first_loss"])
    return rec


def doc(rows, **meta):
    base = dict(gpu="NVIDIA H200", versions=dict(torch="2.11.0", transformers="5.17.0", peft="0.21.2",
                                                  bitsandbytes="0.50.2", trl="1.16.0", triton="3.6.0"),
                versions_peer=dict(unsloth="2026.10.9", trl="1.15.0"))
    base.update(meta)
    return dict(meta=base, rows=rows, raw=[])


def test_markdown_tables_ratios_targets_and_t4(tmp_path):
    old = doc([speed_rec("llama3-8b-2x2048-bf16", {"hf": job(ln=line("hf", 2700, 19.6, exact=11.9)),
                                                    "unsloth": job(ln=line("u", 10000, 7.0, exact=11.9)),
                                                    "nbtune": job(ln=line("n", 9000, 7.5, exact=11.9))})])
    new = doc([speed_rec("llama3-8b-2x2048-bf16", {"hf": job(ln=line("hf", 2782, 19.62, exact=11.9)),
                                                    "unsloth": job(ln=line("u", 10256, 6.95, exact=11.9)),
                                                    "nbtune": job(ln=line("n", 12307, 6.2, exact=11.9002))}),
               speed_rec("llama2-7b-1x2048-fp16", {"hf": job(ln=line("hf", 3642, 10.52, exact=10.4)),
                                                    "unsloth": job("skipped"),
                                                    "nbtune": job(ln=line("n", 7000, 4.5, exact=10.45))}),
               dict(id="t4-llama3-8b", kind="t4", shape="llama3-8b", label=models.parse_row("t4-llama3-8b").label(),
                    target="met", status="ok",
                    search={"nbtune": dict(attempts=[dict(seq=49152, status="ok")], longest=57344, first_oom=65536,
                                           stopped="first OOM", tokens_per_s=7100, peak_reserved_gib=14.1),
                            "unsloth": dict(attempts=[dict(seq=32768, status="ok")], longest=32768, first_oom=40960,
                                            stopped="first OOM", tokens_per_s=6506, peak_reserved_gib=14.23)})])
    p_old, p_new = tmp_path / "models-20261101-000000.json", tmp_path / "models-20261130-000000.json"
    p_old.write_text(json.dumps(old)); p_new.write_text(json.dumps(new))
    md_path = tmp_path / "RESULTS.md"
    assert models.main(["--from-json", "--out-dir", str(tmp_path), "--markdown", str(md_path)]) == 0
    md = md_path.read_text()
    latest = md.split("## Runs")[0]
    # the latest run wins in the summary table: 12307/10256 = 1.20x, 6.2/6.95 = 0.89x: both targets met
    assert "12,307 · 6.20" in latest and "9,000" not in latest
    assert "| 1.20× | 0.89× | 4.42× | 0.32× |" in latest and "| met | met |" in latest
    # the second row: Unsloth skipped -> no ratio, targets unknown; first loss off by 0.05 -> failed
    l2 = next(l for l in latest.splitlines() if l.startswith("| llama2-7b 1×2048 fp16"))
    assert "skipped" in l2 and "**MISMATCH**" in l2 and l2.rstrip().endswith("failed |")
    # T4: longest contexts, first OOM, target
    assert "| nbtune | 57,344 | 7,100 | 14.10 | — | 65,536 | first OOM | — | met |" in latest
    assert "| Unsloth | 32,768 | 6,506 | 14.23 | — | 40,960 |" in latest
    # every run is listed, newest first, with its meta
    runs = md.split("## Runs")[1]
    assert runs.index("20261130-000000") < runs.index("20261101-000000")
    assert "GPU NVIDIA H200, torch 2.11.0" in runs and "unsloth 2026.10.9 (trl 1.15.0)" in runs
    assert "| 0.90× | 1.07× |" in runs  # the old run's own ratios stay in its section


def test_markdown_without_results(tmp_path):
    text = models.render_markdown([])
    assert "No results yet" in text


# ------------------------------------------------------------------------------------------------
# the driver end to end, with stand-in peers
# ------------------------------------------------------------------------------------------------
FAKE_PEER = textwrap.dedent('''
    import json, os, sys, time
    name = sys.argv[0].rsplit("/", 1)[-1].split(".")[0]
    for spec in sys.argv[1:]:
        shape, b, s, dt = spec.split(":")
        b, s = int(b), int(s)
        mode = os.environ.get("FAKE_MODE_" + name, "ok")
        if mode == "crash":
            raise AssertionError("gradient checkpointing is not active")
        if mode == "hang":
            time.sleep(60)
        limit = int(os.environ.get("FAKE_LIMIT_" + name, "10**9").replace("10**9", "1000000000"))
        if b * s > limit:
            print(json.dumps(dict(peer=name, shape=shape, batch=str(b), seqlen=str(s), error="OOM")), flush=True)
            continue
        host = int(os.environ.get("FAKE_HOST_BYTES_PER_TOKEN_" + name, 0)) * b * s
        if host:  # what offloading puts on the host grows with the context
            held = bytearray(host)
            held[::4096] = b"1" * len(held[::4096])
        print("a banner line that is not JSON")
        tps = int(os.environ.get("FAKE_TPS_" + name, 1000))
        if os.environ.get("FAKE_TPS_SEQ_" + name):  # one value per run, in run order (counted in a file)
            counter = os.environ["FAKE_COUNTER"] + "." + name
            done = open(counter).read().count("x") if os.path.exists(counter) else 0
            open(counter, "a").write("x")
            open(os.environ["FAKE_COUNTER"] + ".order", "a").write(name + " ")
            tps = int(os.environ["FAKE_TPS_SEQ_" + name].split(",")[done])
        print(json.dumps(dict(peer=name + "-9", shape=shape, batch=b, seqlen=s, dtype=dt,
                              tokens_per_s=tps,
                              peak_reserved_gib=round(float(os.environ.get("FAKE_GIB_" + name, 5)) + s / 1e6, 3),
                              first_loss=11.9, first_loss_exact=11.9 + float(os.environ.get("FAKE_DLOSS_" + name, 0)),
                              cap_gib=float(os.environ.get("MEM_CAP_GIB", 0)),
                              sdpa_env=os.environ.get("NBTUNE_BENCH_SDPA"), steps_env=os.environ.get("STEPS"))),
              flush=True)
        print("# bench-sdpa " + json.dumps(dict(backend=os.environ.get("NBTUNE_BENCH_SDPA"), calls=7)), file=sys.stderr)
''')


@pytest.fixture
def fake_peers(tmp_path, monkeypatch):
    scripts = {}
    for peer in ("hf", "unsloth", "nbtune"):
        path = tmp_path / f"{peer}.py"
        path.write_text(FAKE_PEER)
        scripts[peer] = str(path)
    fake = {peer: dict(models.PEERS[peer], script=scripts[peer], needs=["json"]) for peer in models.PEERS}
    monkeypatch.setattr(models, "PEERS", fake)
    for key in list(os.environ):
        if key.startswith("FAKE_"):
            monkeypatch.delenv(key)
    out = tmp_path / "results"
    return dict(out=out, md=tmp_path / "RESULTS.md",
                base=["--out-dir", str(out), "--markdown", str(tmp_path / "RESULTS.md"), "--no-build",
                      "--ckpt-root", str(tmp_path / "ckpt")])


def read_run(out_dir):
    paths = sorted(p for p in os.listdir(out_dir) if p.endswith(".json"))
    assert len(paths) == 1
    with open(os.path.join(out_dir, paths[0])) as f:
        return json.load(f)


def test_driver_missing_peer_is_skipped_and_oom_is_a_result(fake_peers, monkeypatch, capsys):
    models.PEERS["unsloth"]["needs"] = ["json", "nbtune_bench_no_such_module"]
    monkeypatch.setenv("FAKE_LIMIT_hf", "3000")  # HF runs out of memory at 2x2048
    monkeypatch.setenv("FAKE_TPS_nbtune", "2000")
    rc = models.main(fake_peers["base"] + ["--rows", "llama3-8b-2x2048-bf16,llama2-7b-1x2048-fp16"])
    assert rc == 0
    run = read_run(fake_peers["out"])
    assert run["meta"]["unavailable"]["unsloth"].startswith("not installed: nbtune_bench_no_such_module")
    r1, r2 = run["rows"]
    assert r1["results"]["unsloth"]["status"] == "skipped"
    assert r1["results"]["hf"]["status"] == "oom"
    assert r1["results"]["nbtune"]["status"] == "ok" and r1["results"]["nbtune"]["line"]["tokens_per_s"] == 2000
    assert r1["first_loss"]["status"] == "unchecked"
    assert r2["results"]["hf"]["status"] == "ok" and r2["first_loss"]["status"] == "ok"
    assert r2["ratios"]["speed_vs_hf"] == 2.0 and r2["ratios"]["speed_vs_unsloth"] is None
    assert {l["peer_key"] for l in run["raw"]} == {"hf", "nbtune"} and len(run["raw"]) == 4
    assert r2["results"]["hf"]["sdpa"] == {"backend": None, "calls": 7}
    md = fake_peers["md"].read_text()
    assert "llama3-8b 2×2048 bf16" in md and "OOM" in md and "skipped" in md
    assert "unsloth (not installed: nbtune_bench_no_such_module)" in md
    logs = [p for p in os.listdir(fake_peers["out"]) if p.endswith(".log")]
    assert logs and "===== llama2-7b-1x2048-fp16 · nbtune" in (fake_peers["out"] / logs[0]).read_text()


def test_driver_rounds_alternate_the_peers_and_take_each_ones_median_run(fake_peers, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_COUNTER", str(tmp_path / "runs"))
    monkeypatch.setenv("FAKE_TPS_SEQ_nbtune", "1100,900,1300")
    monkeypatch.setenv("FAKE_TPS_SEQ_unsloth", "1000,500,1000")
    rc = models.main(fake_peers["base"] + ["--rows", "llama3-8b-1x2048-fp16", "--peers", "unsloth,nbtune",
                                           "--rounds", "3"])
    assert rc == 0
    assert (tmp_path / "runs.order").read_text().split() == ["unsloth", "nbtune", "nbtune", "unsloth", "unsloth",
                                                             "nbtune"]
    (row,) = read_run(fake_peers["out"])["rows"]
    nb, un = row["results"]["nbtune"], row["results"]["unsloth"]
    assert nb["line"]["tokens_per_s"] == 1100 and un["line"]["tokens_per_s"] == 1000  # the medians
    assert [r["tokens_per_s"] for r in nb["rounds"]] == [1100, 900, 1300]
    assert row["ratios"]["speed_vs_unsloth"] == 1.1
    assert "median of 3 runs per peer" in fake_peers["md"].read_text()
    with pytest.raises(SystemExit):
        models.build_parser().parse_args(["--rounds", "0"])


def test_driver_marks_first_loss_mismatch_and_crash_as_failed(fake_peers, monkeypatch):
    monkeypatch.setenv("FAKE_DLOSS_nbtune", "0.01")
    rc = models.main(fake_peers["base"] + ["--rows", "llama2-7b-2x2048-bf16", "--peers", "hf,nbtune"])
    assert rc == 1
    row = read_run(fake_peers["out"])["rows"][0]
    assert row["first_loss"]["status"] == "mismatch" and row["status"] == "failed"
    monkeypatch.setenv("FAKE_MODE_nbtune", "crash")
    for p in fake_peers["out"].iterdir():
        p.unlink()
    assert models.main(fake_peers["base"] + ["--rows", "llama2-7b-2x2048-bf16", "--peers", "hf,nbtune"]) == 1
    row = read_run(fake_peers["out"])["rows"][0]
    nb = row["results"]["nbtune"]
    assert nb["status"] == "error" and "AssertionError" in nb["detail"] and "AssertionError" in nb["stderr_tail"]
    assert row["status"] == "failed"


def test_driver_t4_search_stops_at_each_peers_first_oom(fake_peers, monkeypatch):
    monkeypatch.setenv("FAKE_LIMIT_unsloth", "39000")  # 32k fits, 40k does not
    monkeypatch.setenv("FAKE_LIMIT_nbtune", "60000")   # 56k fits, 64k does not
    rc = models.main(fake_peers["base"] + ["--rows", "t4", "--peers", "hf,unsloth,nbtune", "--t4-steps", "1:2"])
    assert rc == 0
    row = read_run(fake_peers["out"])["rows"][0]
    assert list(row["search"]) == ["unsloth", "nbtune"]  # in --peers order; HF is not searched
    un, nb = row["search"]["unsloth"], row["search"]["nbtune"]
    assert [a["seq"] for a in un["attempts"]] == [32768, 40960] and un["longest"] == 32768 and un["first_oom"] == 40960
    assert [a["seq"] for a in nb["attempts"]] == [32768, 40960, 49152, 57344, 65536] and nb["longest"] == 57344
    assert row["target"] == "met" and nb["sdpa_calls"] == 7
    first = nb["attempts"][0]
    assert first["line"]["cap_gib"] == 14.3 and first["line"]["sdpa_env"] == "efficient" and first["line"]["steps_env"] == "2"
    # under the host cap (the default 12.7 GB), nbtune checkpoints as "auto" does in a run
    assert first["env"] == {"MEM_CAP_GIB": "14.3", "NBTUNE_BENCH_SDPA": "efficient", "NBTUNE_BENCH_GC": "auto",
                            "WARMUP": "1", "STEPS": "2"}
    md = fake_peers["md"].read_text()
    assert "57,344" in md and "32,768" in md


def test_driver_t4_search_stops_at_the_host_ram_cap(fake_peers, monkeypatch):
    """Each t4 peer process runs in a memory cgroup: a peer whose host memory grows with the context
    is OOM-killed at the cap, which ends its search like a GPU OOM. Where no cgroup can be made
    (not root), nothing is enforced: the run says so and records the peak RSS."""
    monkeypatch.setenv("FAKE_HOST_BYTES_PER_TOKEN_nbtune", "7000")  # 48k: 344 MB; 56k: 401 MB
    rc = models.main(fake_peers["base"] + ["--rows", "t4", "--peers", "nbtune", "--t4-steps", "1:2",
                                           "--t4-host-cap-gb", "0.4", "--t4-contexts", "32768,49152,57344"])
    assert rc == 0
    row = read_run(fake_peers["out"])["rows"][0]
    nb = row["search"]["nbtune"]
    assert row["host_cap_gb"] == 0.4
    first = nb["attempts"][0]
    assert 0.2 < first["host"]["peak_rss_gb"] < 0.4
    if first["host"]["capped"]:
        assert nb["longest"] == 49152 and nb["first_oom"] == 57344 and nb["host_capped"]
        last = nb["attempts"][-1]
        assert last["status"] == "oom" and "host RAM" in last["detail"] and last["host"]["oom_kills"] >= 1
        assert 0.3 < nb["host_peak_rss_gb"] < 0.4
    else:
        assert nb["longest"] == 57344 and "cap not enforced" in fake_peers["md"].read_text()


def test_driver_timeout_and_time_budget(fake_peers, monkeypatch):
    monkeypatch.setenv("FAKE_MODE_hf", "hang")
    rc = models.main(fake_peers["base"] + ["--rows", "llama2-7b-2x2048-bf16,llama3-8b-2x2048-bf16",
                                           "--peers", "hf,nbtune", "--row-timeout", "2", "--time-budget", "30",
                                           "--min-job-s", "3"])
    run = read_run(fake_peers["out"])
    r1 = run["rows"][0]
    assert r1["results"]["hf"]["status"] == "timeout" and r1["results"]["hf"]["seconds"] < 20
    assert r1["results"]["nbtune"]["status"] == "ok" and r1["status"] == "incomplete"
    assert rc == 0
    # a budget already spent: nothing starts, every job says so
    for p in fake_peers["out"].iterdir():
        p.unlink()
    monkeypatch.delenv("FAKE_MODE_hf")
    models.main(fake_peers["base"] + ["--rows", "llama2-7b-2x2048-bf16", "--peers", "hf,nbtune",
                                      "--time-budget", "0.001"])
    row = read_run(fake_peers["out"])["rows"][0]
    assert {j["status"] for j in row["results"].values()} == {"not_reached"}
    assert "time budget" in row["results"]["hf"]["detail"]


def test_unsloth_gets_the_peer_site_first_on_its_path(tmp_path):
    args = models.build_parser().parse_args(["--peer-site", "/tmp/site_peer", "--ckpt-root", "/x"])
    env = models.peer_env("unsloth", args, {"MEM_CAP_GIB": "14.3"})
    assert env["PYTHONPATH"].split(os.pathsep)[0] == "/tmp/site_peer"
    assert env["MEM_CAP_GIB"] == "14.3" and env["CKPT_ROOT"] == "/x" and env["HF_HUB_OFFLINE"] == "1"
    assert "/tmp/site_peer" not in models.peer_env("nbtune", args)["PYTHONPATH"]
    assert "MEM_CAP_GIB" not in models.peer_env("hf", args)


def test_gpu_suite_script_parses():
    subprocess.run(["bash", "-n", os.path.join(REPO, "benchmarks", "gpu_suite.sh")], check=True)


def test_driver_stopped_by_sigterm_kills_its_peer_and_keeps_results(fake_peers, monkeypatch, tmp_path):
    import signal
    import threading

    pidfile = tmp_path / "hung.pid"
    hang = FAKE_PEER.replace('    if mode == "hang":\n', '    if mode == "hang":\n        open(%r, "w").write(str(os.getpid()))\n' % str(pidfile))
    assert hang != FAKE_PEER
    open(models.PEERS["nbtune"]["script"], "w").write(hang)
    monkeypatch.setenv("FAKE_MODE_nbtune", "hang")
    previous = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        rc = models.main(fake_peers["base"] + ["--rows", "llama2-7b-2x2048-bf16,llama3-8b-2x2048-bf16,t4",
                                               "--peers", "hf,nbtune"])
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert rc == 0
    run = read_run(fake_peers["out"])
    assert run["meta"]["terminated"] is True
    r1, r2, r3 = run["rows"]
    assert r1["results"]["hf"]["status"] == "ok"
    assert r1["results"]["nbtune"]["status"] == "not_reached" and r1["status"] == "incomplete"
    assert r2["status"] == "not_reached" and r2["results"]["hf"]["status"] == "not_reached"
    assert r3["kind"] == "t4" and r3["search"] == {}
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "not reached" in fake_peers["md"].read_text()


def test_t4_rows_checkpoint_as_auto_does_within_the_capped_host(tmp_path, monkeypatch):
    """Under the T4 rows' host cap the bare-loop nbtune peer takes the checkpointing a run's
    ``gradient_checkpointing: auto`` takes: at 49,152 tokens on a host held to free Colab's 12.7 GB,
    only part of the layers offloaded, the rest on the GPU; with no cap set, every layer (``offload``)."""
    import json as _json

    from nbtune.planner import host as planner_host

    bench = os.path.join(REPO, "benchmarks")
    peer = load_script("nbtune_bench_nbtune_peer", os.path.join(bench, "nbtune_peer.py"))
    common = load_script("bench_common", os.path.join(bench, "peers", "bench_common.py"))
    cfg = dict(common.SHAPES["llama3-8b"], model_type="llama", architectures=["LlamaForCausalLM"],
               max_position_embeddings=49152, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(_json.dumps(cfg))
    monkeypatch.delenv("NBTUNE_BENCH_GC", raising=False)
    assert peer.checkpointing_for(str(tmp_path), 1, 49152, "float16") == ("offload", None, "NBTUNE_BENCH_GC")
    monkeypatch.setenv("NBTUNE_BENCH_GC", "auto")
    # "the GPU here" as on the GPU machine, named (none here); this host's RAM held to 12.7 GB
    monkeypatch.setenv("NBTUNE_GPU", "T4")
    monkeypatch.delenv("NBTUNE_HOST_RAM", raising=False)  # the tests' "off": this host's RAM is read
    monkeypatch.setattr(planner_host, "read_cgroup_memory", lambda *a, **k: (int(12.7e9), 0))
    mode, layers, reason = peer.checkpointing_for(str(tmp_path), 1, 49152, "float16")
    assert mode == "offload" and 0 < layers < 32, (mode, layers, reason)
    assert "host" in reason.lower()
