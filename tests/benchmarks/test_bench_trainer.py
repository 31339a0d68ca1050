"""benchmarks/trainer.py without a GPU: rows, the data it writes (real tokenizer, real text), the step
clock's figures, how a peer process's end is classified, the tables and RESULTS.md's lead, and the
whole run end to end on a tiny model with the nbtune and TRL peers (CPU, fp32, a few steps)."""
import importlib.util
import json
import os
import sys

import pytest

from bench_scripts import BENCH, REPO, load_script

sys.path.insert(0, os.path.join(BENCH, "peers"))
import trainer_common  # noqa: E402

trainer = load_script("nbtune_bench_trainer", os.path.join(BENCH, "trainer.py"))
report = trainer.report
data = sys.modules["trainer_data"]  # the module trainer.py imported (one copy of its classes)


# ------------------------------------------------------------------------------------------------
# rows, peers, arguments
# ------------------------------------------------------------------------------------------------
def test_main_rows_cover_both_data_sets_both_shapes_packing_on_and_off():
    rows = trainer.select_rows("main")
    assert {(r.data, r.batch, r.seq, r.dtype, r.packing) for r in rows} == {
        (d, b, s, dt, p) for d in ("text", "gsm8k") for b, s, dt in ((2, 2048, "bfloat16"), (1, 2048, "float16"))
        for p in (True, False)}
    assert not any(r.t4 for r in rows) and len(rows) == 8
    t4 = trainer.select_rows("t4")
    assert [(r.id, r.data, r.batch, r.seq, r.dtype, r.packing, r.t4) for r in t4] == [
        ("t4-text-1x4096-packed", "text", 1, 4096, "float16", True, True),
        ("t4-gsm8k-1x4096-packed", "gsm8k", 1, 4096, "float16", True, True)]
    assert [r.id for r in trainer.select_rows("all")] == trainer.MAIN_ROWS + trainer.T4_ROWS
    assert [r.id for r in trainer.select_rows("quick")] == ["text-2x2048-bf16-packed", "gsm8k-2x2048-bf16-unpacked"]
    assert trainer.parse_row("t4-gsm8k-1x4096-fp16-packed").id == "t4-gsm8k-1x4096-packed"
    assert trainer.parse_row("t4-text-1x8192-packed").label() == "T4 emulation: text 1×8192 fp16 packed"


def test_split_rows_cut_documents_to_fill_rows_in_every_peer(tmp_path):
    rows = trainer.select_rows("split")
    assert [(r.id, r.packing, r.split) for r in rows] == [("text-2x2048-bf16-split", True, True),
                                                           ("text-1x2048-fp16-split", True, True)]
    assert rows[1].label() == "text 1×2048 fp16 packed, split" and not rows[1].same_batches
    assert not trainer.parse_row("text-1x2048-fp16-packed").split
    argv = ["--model", "m", "--data", "d.jsonl", "--batch", "1", "--seq", "2048", "--dtype", "float16",
            "--out", str(tmp_path), "--packing"]
    import trainer_nbtune
    import trainer_trl

    whole, split = trainer_common.parse_args(argv), trainer_common.parse_args(argv + ["--packing-strategy", "split"])
    assert trainer_nbtune.finetune_config(whole, "text")["data"]["packing"] is True
    assert trainer_nbtune.finetune_config(split, "text")["data"]["packing"] == "split"
    assert trainer_trl.sft_config(whole, "trl", "text").packing_strategy == "bfd"
    assert trainer_trl.sft_config(split, "trl", "text").packing_strategy == "wrapped"
    with pytest.raises(SystemExit):  # a strategy without packing
        trainer_common.parse_args(argv[:-1] + ["--packing-strategy", "split"])


def test_row_selection_globs_dedup_and_bad_rows():
    rows = trainer.select_rows("gsm8k-*-unpacked, text-1x128-fp32-packed, gsm8k-2x2048-bf16-unpacked")
    assert [r.id for r in rows] == ["gsm8k-2x2048-bf16-unpacked", "gsm8k-1x2048-fp16-unpacked",
                                    "text-1x128-fp32-packed"]
    for bad in ("nope", "wiki-2x2048-bf16-packed", "text-2x2048-fp8-packed", "text-2x2048-bf16",
                "t4-text-1x4096-bf16-packed", "text-2x2048-packed", "zzz*", "text-0x2048-bf16-packed"):
        with pytest.raises(ValueError):
            trainer.select_rows(bad)


def test_peers_and_arguments(capsys):
    assert trainer.parse_peers("trl,nbtune,trl") == ["trl", "nbtune"]
    with pytest.raises(ValueError):
        trainer.parse_peers("nbtune,liger")
    args = trainer.build_parser().parse_args([])
    assert (args.rows, args.peers, args.steps, args.text_tokens, args.t4_cap_gib, args.t4_sdpa) == (
        "quick", "nbtune,unsloth,trl", (2, 5), (1024, 2048), 14.3, "efficient")
    for bad in (["--steps", "3"], ["--steps", "2:0"], ["--text-tokens", "2048:1024"]):
        with pytest.raises(SystemExit):
            trainer.build_parser().parse_args(bad)
    capsys.readouterr()
    assert trainer.main(["--rows", "nope"]) == 2
    assert trainer.main(["--list", "--rows", "t4-text-1x4096-packed", "--steps", "1:3"]) == 0
    out = capsys.readouterr().out
    assert "1 warm-up + 3 timed steps" in out and "MEM_CAP_GIB=14.3 NBTUNE_BENCH_SDPA=efficient" in out


# ------------------------------------------------------------------------------------------------
# the data: SmolLM2's tokenizer, GSM8K's text
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets():
    return data.resolve_assets(None)


def test_long_text_rows_have_the_asked_token_counts(assets):
    tok = data.load_tokenizer(assets[0])
    passages = [f"{r['question']}\n{r['answer']}" for r in data.gsm8k_rows(assets[1])[:300]]
    rows = data.long_text_rows(passages, tok, 12, 1024, 2048, seed=3)
    lengths = [data.text_length(tok, t) for t in rows]
    assert all(1024 <= n <= 2048 for n in lengths) and len(set(lengths)) > 6  # spread over the range
    assert data.long_text_rows(passages, tok, 12, 1024, 2048, seed=3) == rows  # seeded
    assert all("\n" in t and t.strip() == t for t in rows)  # passages joined, real text
    # the end-of-sequence token is counted: both trainers append it to a text row
    assert data.text_length(tok, rows[0]) == len(tok(rows[0])["input_ids"]) + 1
    with pytest.raises(ValueError):
        data.long_text_rows(passages[:2], tok, 1, 1024, 2048)  # not enough text for one row
    with pytest.raises(ValueError):
        data.long_text_rows(passages, tok, 1, 2048, 1024)


def test_write_data_and_the_checkpoint_config(tmp_path, assets):
    info = data.write_data(str(tmp_path), *assets, text_rows=5, text_lo=100, text_hi=200, chat_rows=30)
    texts = [json.loads(line) for line in open(info["text"]["path"])]
    chats = [json.loads(line) for line in open(info["gsm8k"]["path"])]
    assert len(texts) == 5 and set(texts[0]) == {"text"}
    assert len(chats) == 30 and [m["role"] for m in chats[0]["messages"]] == ["user", "assistant"]
    assert 100 <= info["text"]["min"] <= info["text"]["max"] <= 200 and info["gsm8k"]["rows"] == 30
    tok = data.load_tokenizer(assets[0])
    # the padding token is in no row: the trainers' non-padding count is the real token count
    pad = tok.pad_token_id
    ids = tok([t["text"] for t in texts] + tok.apply_chat_template([c["messages"] for c in chats], tokenize=False),
              add_special_tokens=False)["input_ids"]
    assert pad is not None and pad != tok.eos_token_id and not any(pad in row for row in ids)
    assert info["tokenizer"]["vocab"] == len(tok) == 49152
    cfg = data.checkpoint_config("llama3-8b", tok)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (
        4096, 14336, 32, 8)
    assert cfg.vocab_size == 49152 and cfg.pad_token_id == pad and cfg.eos_token_id == tok.eos_token_id
    assert data.checkpoint_name("llama3-8b", 49152) == "llama3-8b-v49152"
    with pytest.raises(data.AssetsMissing, match="export"):
        data.resolve_assets(str(tmp_path / "none"))


def test_exported_assets_are_enough(tmp_path, assets):
    dest = data.export_assets(str(tmp_path / "assets"))
    tok_dir, rows = data.resolve_assets(dest)
    assert tok_dir == dest and os.path.isfile(rows)
    assert len(data.load_tokenizer(tok_dir)) == 49152 and len(data.gsm8k_rows(rows)) == 1000


# ------------------------------------------------------------------------------------------------
# the clock's figures and a process's end
# ------------------------------------------------------------------------------------------------
def clock(t0, times, tokens, losses=None):
    c = trainer_common.StepClock()
    c.t0, c.times, c.tokens = t0, list(times), list(tokens)
    c.losses = list(losses or [2.0] * len(times))
    return c


def test_summary_leaves_out_the_warm_up():
    # steps of 3.0 (compile), 1.0, 0.5, 1.5 s; 100, 200, 300, 100 real tokens; batch 2 x seq 200
    s = trainer_common.summarize(clock(10.0, [13.0, 14.0, 14.5, 16.0], [100, 300, 600, 700], [9, 8, 7, 6]), 1, 2, 200)
    assert s["step_s_each"] == [3.0, 1.0, 0.5, 1.5] and s["tokens_each"] == [100, 200, 300, 100]
    assert s["steps"] == 3 and s["warmup"] == 1
    assert s["s_per_step"] == 1.0  # median of 1.0, 0.5, 1.5
    assert s["tokens_per_s"] == 200  # 600 tokens over 3.0 s
    assert s["fill"] == round(200 / 400, 4) and s["tokens_per_step"] == 200
    assert (s["first_loss"], s["last_loss"]) == (9, 6)
    with pytest.raises(ValueError, match="no timed step"):
        trainer_common.summarize(clock(0.0, [1.0, 2.0], [5, 10]), 2, 1, 8)
    with pytest.raises(ValueError, match="no input tokens"):
        trainer_common.summarize(clock(0.0, [1.0, 2.0], [0, 0]), 1, 1, 8)
    with pytest.raises(ValueError, match="never began"):
        trainer_common.summarize(clock(None, [1.0], [5]), 0, 1, 8)


def test_a_process_end_is_classified():
    ok = dict(peer="trl", tokens_per_s=10, s_per_step=1.0)
    assert trainer.classify(0, [ok], "", False, 3)["status"] == "ok"
    oom = trainer.classify(1, [dict(peer="trl", error="OOM", detail="CUDA out of memory")], "", False, 3)
    assert (oom["status"], oom["detail"]) == ("oom", "CUDA out of memory")
    err = trainer.classify(1, [dict(peer="nbtune", error="ConfigError", detail="data.packing: bad")], "", False, 3)
    assert err["status"] == "error" and err["detail"] == "ConfigError: data.packing: bad"
    assert trainer.classify(None, [], "", True, 300)["status"] == "timeout"
    crash = trainer.classify(1, [], "Traceback\nRuntimeError: CUDA error: out of memory\n", False, 3)
    assert crash["status"] == "oom"
    died = trainer.classify(-9, [], "Traceback\nKeyError: 'x'\n", False, 3)
    assert died["status"] == "error" and "KeyError" in died["detail"]
    assert trainer.parse_lines('banner\n{"peer": "a", "x": 1}\n{not json\n{"y": 2}\n') == [{"peer": "a", "x": 1}]


def test_error_lines_name_an_oom():
    import torch

    line = trainer_common.error_line(dict(peer="nbtune"), torch.OutOfMemoryError("CUDA out of memory. Tried 2 GiB"))
    assert line["error"] == "OOM" and line["detail"].startswith("CUDA out of memory")
    assert trainer_common.error_line({}, ValueError("bad\nmore"))["error"] == "ValueError"
    assert trainer_common.error_line({}, ValueError("bad\nmore"))["detail"] == "bad"


# ------------------------------------------------------------------------------------------------
# tables and RESULTS.md
# ------------------------------------------------------------------------------------------------
def job(peer, status="ok", tps=None, s=None, fill=None, gib=None, detail="", **line):
    out = dict(peer=peer, status=status, detail=detail, line=None)
    if status == "ok":
        out["line"] = dict(peer=peer, tokens_per_s=tps, s_per_step=s, fill=fill, peak_reserved_gib=gib, **line)
    return out


def rec(row_id, results):
    row = trainer.parse_row(row_id)
    out = row.record()
    out["results"] = results
    out["checks"] = trainer.row_checks(results, row.packing)
    return out


def doc(rows, **meta):
    base = dict(gpu="NVIDIA H100 80GB HBM3", versions=dict(torch="2.11.0", transformers="5.17.0", trl="1.16.0"),
                versions_peer=dict(unsloth="2026.10.9", trl="1.15.0"), steps=[2, 5],
                data=dict(text=dict(rows=96, min=1030, max=2046, mean=1540.2),
                          gsm8k=dict(rows=1000, min=102, max=553, mean=219.7)))
    base.update(meta)
    return dict(meta=base, rows=rows)


def test_run_table_ratios_statuses_and_notes():
    results = {"nbtune": job("nbtune", tps=12000, s=0.33, fill=0.97, gib=6.61, tokens_each=[3, 4], first_loss=10.8),
               "unsloth": job("unsloth", tps=10000, s=0.4, fill=0.97, gib=7.2, tokens_each=[3, 5], first_loss=10.9),
               "trl": job("trl", "skipped", detail="not importable: trl")}
    d = doc([rec("text-2x2048-bf16-unpacked", results),
             rec("gsm8k-1x2048-fp16-unpacked", {"nbtune": job("nbtune", "error", detail="exit 1: KeyError: 'x'"),
                                                "unsloth": job("unsloth", "oom", detail="CUDA out of memory")})])
    md = report.run_markdown(d, "20261201-000000")
    lines = md.splitlines()
    assert "| row | peer | real tokens/s | s/step | fill | peak reserved GiB | nbtune speed × | status |" in lines
    assert "| text 2×2048 bf16 unpacked | nbtune.finetune | 12,000 | 0.330 | 0.97 | 6.61 | — | ok |" in lines
    assert "| text 2×2048 bf16 unpacked | Unsloth + TRL SFTTrainer | 10,000 | 0.400 | 0.97 | 7.20 | 1.20× | ok |" in lines
    assert ("| text 2×2048 bf16 unpacked | TRL SFTTrainer + peft + bnb | — | — | — | — | — | "
            "skipped: not importable: trl |") in lines
    assert any(l.startswith("| gsm8k 1×2048 fp16 unpacked | nbtune.finetune |") and "error: exit 1: KeyError" in l
               for l in lines)
    assert any("| OOM |" in l for l in lines)
    assert "GPU NVIDIA H100 80GB HBM3" in md and "text: 96 rows of 1,030-2,046 tokens" in md
    assert "unsloth 2026.10.9 (trl 1.15.0)" in md and "2 warm-up + 5 timed steps" in md
    notes = md.split("Notes:")[1]
    assert "other token counts than nbtune's" in notes and "first loss 0.1 away" in notes
    assert "skipped: not importable: trl" in notes
    packed = report.run_markdown(doc([rec("text-2x2048-bf16-packed", results)]), "20261201-000000")
    assert "other token counts" not in packed and "first loss" not in packed  # each tool packs its own way


def test_results_md_leads_with_the_latest_trainer_measurement(tmp_path):
    old = doc([rec("text-2x2048-bf16-packed", {"nbtune": job("nbtune", tps=9000, s=0.5, fill=0.9, gib=6.0)})])
    new = doc([rec("gsm8k-2x2048-bf16-unpacked", {"nbtune": job("nbtune", tps=3000, s=0.1, fill=0.1, gib=5.0),
                                                  "trl": job("trl", tps=1000, s=0.3, fill=0.1, gib=9.0)}),
               rec("text-2x2048-bf16-packed", {"nbtune": job("nbtune", "not_reached", detail="time budget")})])
    (tmp_path / "trainer-20261101-000000.json").write_text(json.dumps(old))
    (tmp_path / "trainer-20261130-000000.json").write_text(json.dumps(new))
    md_path = tmp_path / "RESULTS.md"
    assert trainer.main(["--from-json", "--out-dir", str(tmp_path), "--markdown", str(md_path)]) == 0
    md = md_path.read_text()
    first_section = md.split("\n## ")[1]
    assert first_section.startswith("Trainer path: nbtune.finetune vs Unsloth + TRL")
    lead = [l for l in first_section.splitlines() if l.startswith("| ")]
    # text first (the newest run did not reach it: the older measurement stays), then gsm8k from the newest
    assert lead[0] == ("| row | run | peer | real tokens/s | s/step | fill | peak reserved GiB | nbtune speed × "
                       "| status |")
    assert lead[1].startswith("| text 2×2048 bf16 packed | 20261101-000000 | nbtune.finetune | 9,000 |")
    assert lead[2].startswith("| gsm8k 2×2048 bf16 unpacked | 20261130-000000 | nbtune.finetune | 3,000 |")
    assert lead[3].startswith("| gsm8k 2×2048 bf16 unpacked | 20261130-000000 | TRL SFTTrainer + peft + bnb | 1,000 |")
    assert lead[3].endswith("| 3.00× | ok |") and len(lead) == 4
    # the bare-loop section follows, as models.py writes it (no models results here)
    assert md.index("## Trainer path") < md.index("## Bare training loops") < md.index("No results yet")


def test_results_md_without_trainer_results_is_models_own(tmp_path):
    models = trainer.models
    assert "Trainer path" not in models.render_markdown([])
    md = models.write_markdown([], str(tmp_path / "R.md"), trainer_paths=[])
    assert md == models.render_markdown([])


# ------------------------------------------------------------------------------------------------
# end to end on the CPU: the real peers, a tiny model, real tokens
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out, work = tmp_path / "results", tmp_path / "work"
    md = tmp_path / "RESULTS.md"
    argv = ["--rows", "text-1x128-fp32-unpacked,gsm8k-2x256-fp32-packed,text-1x128-fp32-split", "--peers", "nbtune,unsloth,trl",
            "--steps", "1:2", "--model", str(tiny_model_dir), "--text-rows", "3", "--text-tokens", "60:120",
            "--chat-rows", "40", "--out-dir", str(out), "--work", str(work), "--markdown", str(md),
            "--python", sys.executable, "--row-timeout", "600"]
    assert trainer.main(argv) == 0, capsys.readouterr().out
    (path,) = [p for p in os.listdir(out) if p.endswith(".json")]
    result = json.loads((out / path).read_text())
    meta = result["meta"]
    assert meta["steps"] == [1, 2] and meta["model"]["path"] == str(tiny_model_dir)
    assert meta["data"]["text"]["rows"] == 3 and meta["data"]["gsm8k"]["rows"] == 40
    rows = {r["id"]: r for r in result["rows"]}
    assert list(rows) == ["text-1x128-fp32-unpacked", "gsm8k-2x256-fp32-packed", "text-1x128-fp32-split"]
    if importlib.util.find_spec("unsloth") is None:  # absent here: reported as skipped, with the reason
        for r in rows.values():
            assert r["results"]["unsloth"]["status"] == "skipped"
            assert r["results"]["unsloth"]["detail"] == "not importable: unsloth"
        assert meta["unavailable"] == {"unsloth": "not importable: unsloth"}
    for rid, r in rows.items():
        for peer in ("nbtune", "trl"):
            j = r["results"][peer]
            assert j["status"] == "ok", (rid, peer, j.get("detail"), j.get("stderr_tail"))
            line = j["line"]
            batch, seq = r["batch"], r["seq"]
            assert line["row"] == rid and (line["batch"], line["seq"], line["dtype"]) == (batch, seq, "float32")
            assert line["packing"] == r["packing"] and (line["warmup"], line["steps"]) == (1, 2)
            assert len(line["step_s_each"]) == len(line["tokens_each"]) == 3
            assert line["tokens_per_s"] > 0 and line["s_per_step"] > 0 and line["peak_reserved_gib"] is None
            assert 0 < line["fill"] <= 1 and all(0 < n <= batch * seq for n in line["tokens_each"])
            assert line["fill"] == round(sum(line["tokens_each"][1:]) / 2 / (batch * seq), 4)
        if r["packing"]:  # each tool packs its own way: no same-batch check
            assert r["checks"] == dict(same_tokens={}, first_loss_diff={})
        else:
            assert r["checks"]["same_tokens"] == {"trl": True}  # same rows, same order, same tokenization
            assert r["checks"]["first_loss_diff"]["trl"] < 1e-3  # same weights and first batch
    nb = rows["text-1x128-fp32-unpacked"]["results"]["nbtune"]["line"]
    # unpacked, batch 1, 3 steps over 3 rows shorter than seq: one epoch, every real token counted once
    assert sum(nb["tokens_each"]) == meta["data"]["text"]["tokens"]
    assert nb["dashboard"] == "on" and nb["dashboard_renders"] >= 1 and nb["format"] == "text"
    packed = rows["gsm8k-2x256-fp32-packed"]["results"]["nbtune"]["line"]
    assert packed["format"] == "messages" and packed["fill"] > 0.6  # packing fills the rows (unpacked: ~0.4)
    # split: the 3 text rows end to end in rows of 128 tokens, each token once over the epoch's 3 steps
    split = rows["text-1x128-fp32-split"]["results"]
    assert split["nbtune"]["line"]["packing_strategy"] == "split" and split["trl"]["line"]["packing_strategy"] == "wrapped"
    assert sorted(split["nbtune"]["line"]["tokens_each"])[1:] == [128, 128]
    assert sum(split["nbtune"]["line"]["tokens_each"]) == meta["data"]["text"]["tokens"]
    # this run's table, and RESULTS.md led by it
    table = (out / path.replace(".json", ".md")).read_text()
    assert "| text 1×128 fp32 unpacked | nbtune.finetune |" in table
    assert "| gsm8k 2×256 fp32 packed | TRL SFTTrainer + peft + bnb |" in table
    assert md.read_text().split("\n## ")[1].startswith("Trainer path")
    log = (out / path.replace(".json", ".log")).read_text()
    assert log.count("===== ") == 6 and "--- stderr" in log  # 3 rows x the 2 peers that ran


# ------------------------------------------------------------------------------------------------
# DPO rows
# ------------------------------------------------------------------------------------------------
def test_dpo_rows_and_alias():
    rows = trainer.select_rows("dpo")
    assert [(r.id, r.data, r.batch, r.seq, r.dtype, r.packing, r.t4, r.method) for r in rows] == [
        ("dpo-gsm8k-1x1024-bf16", "gsm8k", 1, 1024, "bfloat16", False, False, "dpo"),
        ("dpo-gsm8k-2x1024-bf16", "gsm8k", 2, 1024, "bfloat16", False, False, "dpo"),
        ("dpo-gsm8k-1x2048-bf16", "gsm8k", 1, 2048, "bfloat16", False, False, "dpo"),
        ("dpo-gsm8k-1x1024-fp16", "gsm8k", 1, 1024, "float16", False, False, "dpo")]
    row = trainer.parse_row("dpo-gsm8k-4x512-fp32")
    assert (row.id, row.batch, row.seq, row.dtype, row.method) == ("dpo-gsm8k-4x512-fp32", 4, 512, "float32", "dpo")
    assert row.label() == "DPO gsm8k 4×512 fp32" and row.data_key == "dpo-gsm8k-512"
    assert trainer.parse_row("gsm8k-2x2048-bf16-unpacked").data_key == "gsm8k"
    # globs reach the DPO rows; the SFT aliases are what they were
    assert [r.id for r in trainer.select_rows("dpo-*-1x1024-*")] == ["dpo-gsm8k-1x1024-bf16", "dpo-gsm8k-1x1024-fp16"]
    assert [r.id for r in trainer.select_rows("all")] == trainer.MAIN_ROWS + trainer.T4_ROWS
    assert [r.id for r in trainer.select_rows("gsm8k-*-unpacked")] == ["gsm8k-2x2048-bf16-unpacked",
                                                                       "gsm8k-1x2048-fp16-unpacked"]
    for bad in ("dpo-gsm8k-2x1024", "dpo-text-2x1024-bf16", "dpo-gsm8k-2x1024-bf16-packed", "dpo-gsm8k-0x1024-bf16",
                "dpo-gsm8k-2x1024-fp8"):
        with pytest.raises(ValueError):
            trainer.parse_row(bad)


def test_dpo_rows_are_listed(capsys):
    assert trainer.main(["--list", "--rows", "dpo,quick", "--peers", "nbtune,unsloth"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dpo-gsm8k-1x1024-bf16") and "DPO gsm8k 1×1024 bf16: nbtune,unsloth" in out[0]
    assert len(out) == 6 and out[4].startswith("text-2x2048-bf16-packed")


def test_preference_data_fills_the_row_and_both_trainers_read_it(tmp_path, assets):
    from nbtune.assets.preferences import wrong_final
    from nbtune.train.config import DataConfig
    from nbtune.train.preference_data import tokenize_pairs

    info = data.write_preference_data(str(tmp_path), *assets, seq=512, rows=12)
    assert info["path"] == str(tmp_path / "dpo-gsm8k-512.jsonl") and info["seq"] == 512 and info["rows"] == 12
    rows = [json.loads(line) for line in open(info["path"])]
    tok = data.load_tokenizer(assets[0])
    lengths = [data.pair_lengths(tok, r) for r in rows]
    assert all(max(c, r) <= 512 for c, r in lengths) and info["max"] <= 512
    assert info["mean"] > 256 and len({max(x) for x in lengths}) > 6  # long prompts, spread over seq/2..seq
    assert info["tokens"] == sum(c + r for c, r in lengths)
    gsm8k = {r["question"]: r["answer"] for r in data.gsm8k_rows(assets[1])}
    for i, row in enumerate(rows):
        # chat form: earlier exchanges then the question; chosen its own answer, rejected another final number
        assert [t["role"] for t in row["prompt"]][-1] == "user" and len(row["prompt"]) % 2 == 1
        assert [t["role"] for t in row["chosen"]] == [t["role"] for t in row["rejected"]] == ["assistant"]
        answer = gsm8k[row["prompt"][-1]["content"]]
        assert row["chosen"][0]["content"] == answer
        assert row["rejected"][0]["content"] == wrong_final(answer, i) != answer
    assert any(len(r["prompt"]) > 1 for r in rows)
    assert data.write_preference_data(str(tmp_path / "again"), *assets, seq=512, rows=12)["tokens"] == info["tokens"]
    # nbtune's preference reader and TRL's DPOTrainer tokenization give the same ids
    ours, dropped, truncated = tokenize_pairs(rows, tok, DataConfig(format="preference"), 512, "test")
    assert not dropped and not truncated
    import types

    import datasets
    from trl.trainer.dpo_trainer import DPOTrainer

    args = types.SimpleNamespace(dataset_num_proc=None, max_length=512, truncation_mode="keep_start")
    theirs = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), datasets.Dataset.from_list(rows),
                                         tok, args, "train")
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert theirs[col] == ours[col]
    with pytest.raises(ValueError, match="fits"):
        data.preference_pairs(data.gsm8k_rows(assets[1])[:5], tok, 2, 4, 8)


def test_the_lead_table_keeps_each_peers_newest_run_and_compares_only_within_a_run():
    older = doc([rec("text-2x2048-bf16-unpacked", {"nbtune": job("nbtune", tps=7000, s=0.4, fill=0.7, gib=5.4),
                                                   "unsloth": job("unsloth", tps=3500, s=0.8, fill=0.7, gib=5.4)})])
    newer = doc([rec("text-2x2048-bf16-unpacked", {"unsloth": job("unsloth", tps=3800, s=0.7, fill=0.7, gib=5.4),
                                                   "nbtune": dict(peer="nbtune", status="not_reached", detail="budget")})])
    rows = report.latest_rows([("trainer-20261201-000000.json", older), ("trainer-20261202-000000.json", newer)])
    # nbtune's newest measurement is the older run's, Unsloth's the newer run's: one entry per run
    assert [(run, sorted(r["results"])) for run, r in rows] == [("20261201-000000", ["nbtune"]),
                                                                ("20261202-000000", ["unsloth"])]
    lead = "\n".join(report.lead_section([("trainer-20261201-000000.json", older),
                                          ("trainer-20261202-000000.json", newer)]))
    assert "| text 2×2048 bf16 unpacked | 20261201-000000 | nbtune.finetune | 7,000 |" in lead
    assert "| text 2×2048 bf16 unpacked | 20261202-000000 | Unsloth + TRL SFTTrainer | 3,800 |" in lead
    assert "2.00×" not in lead and "1.84×" not in lead  # no ratio across the two runs


def test_dpo_tables_show_the_plan_beside_the_measured_peak():
    nb = job("nbtune", tps=5000, s=0.8, fill=0.7, gib=20.5, first_loss=0.6931, last_loss=0.69,
             plan_reserved_gib=21.25, plan_peak_gib=21.75, tokens_each=[10, 12])
    uns = job("unsloth", tps=4000, s=1.0, fill=0.7, gib=18.0, first_loss=0.6931, last_loss=0.6905,
              reference="ref adapter", tokens_each=[10, 12])
    oom = dict(peer="trl", status="oom", detail="CUDA out of memory", line=dict(peer="trl", error="OOM"))
    d = doc([rec("text-2x2048-bf16-packed", {"nbtune": job("nbtune", tps=9000, s=0.5, fill=0.9, gib=6.0)}),
             rec("dpo-gsm8k-2x1024-bf16", {"nbtune": nb, "unsloth": uns, "trl": oom})],
            data=dict(text=dict(rows=96, min=1030, max=2046, mean=1540.2),
                      **{"dpo-gsm8k-1024": dict(rows=64, min=446, max=1020, mean=760.5, tokens=97000)}))
    md = report.run_markdown(d, "20261201-000000")
    lines = md.splitlines()
    # the SFT table as before, then the DPO rows under their own heading
    assert "| text 2×2048 bf16 packed | nbtune.finetune | 9,000 | 0.500 | 0.90 | 6.00 | — | ok |" in lines
    assert "## DPO" in lines and md.index("| text 2×2048") < md.index("## DPO")
    assert ("| row | peer | real tokens/s | s/step | fill | peak reserved GiB | planned GiB | plan − measured | "
            "loss first → last | nbtune speed × | status |") in lines
    assert ("| DPO gsm8k 2×1024 bf16 | nbtune.finetune (dpo) | 5,000 | 0.800 | 0.70 | 20.50 | 21.25 | +0.75 | "
            "0.6931 → 0.6900 | — | ok |") in lines
    assert ("| DPO gsm8k 2×1024 bf16 | Unsloth PatchDPOTrainer + TRL DPOTrainer | 4,000 | 1.000 | 0.70 | 18.00 | — | "
            "— | 0.6931 → 0.6905 | 1.25× | ok |") in lines
    assert any(l.startswith("| DPO gsm8k 2×1024 bf16 | TRL DPOTrainer + peft + bnb |") and l.endswith("| OOM |")
               for l in lines)
    assert "dpo-gsm8k-1024: 64 pairs of 446-1,020 tokens" in md
    assert "frozen copy of the fresh adapter" in md.split("Notes:")[1]
    summary = report.summary_text(d)
    assert "planned 21.25 (+0.75)" in summary and summary.count("planned") == 1
    # RESULTS.md's lead: DPO rows after the SFT rows, in their own table
    lead = "\n".join(report.lead_section([("trainer-20261201-000000.json", d)]))
    assert lead.index("| text 2×2048 bf16 packed") < lead.index("### DPO") < lead.index("| DPO gsm8k 2×1024 bf16")
    only_dpo = report.run_markdown(doc([rec("dpo-gsm8k-1x1024-fp16", {"nbtune": nb})]), "x")
    assert "| row | peer | real tokens/s | s/step | fill | peak reserved GiB | nbtune speed ×" not in only_dpo


@pytest.mark.slow
def test_dpo_rows_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["--rows", "dpo-gsm8k-2x256-fp32", "--peers", "nbtune,unsloth,trl", "--steps", "1:2",
            "--model", str(tiny_model_dir), "--text-rows", "2", "--text-tokens", "60:120", "--chat-rows", "10",
            "--dpo-rows", "8", "--out-dir", str(out), "--work", str(work), "--markdown", str(tmp_path / "RESULTS.md"),
            "--python", sys.executable, "--row-timeout", "600"]
    assert trainer.main(argv) == 0, capsys.readouterr().out
    (path,) = [p for p in os.listdir(out) if p.endswith(".json")]
    result = json.loads((out / path).read_text())
    pairs = result["meta"]["data"]["dpo-gsm8k-256"]
    assert pairs["rows"] == 8 and pairs["max"] <= 256
    (r,) = result["rows"]
    assert (r["id"], r["method"], r["batch"], r["seq"], r["packing"]) == ("dpo-gsm8k-2x256-fp32", "dpo", 2, 256, False)
    if importlib.util.find_spec("unsloth") is None:  # absent here: its DPO path is reported as skipped, with the reason
        assert r["results"]["unsloth"]["status"] == "skipped"
        assert r["results"]["unsloth"]["detail"] == "not importable: unsloth"
    lines = {}
    for peer in ("nbtune", "trl"):
        j = r["results"][peer]
        assert j["status"] == "ok", (peer, j.get("detail"), j.get("stderr_tail"))
        line = lines[peer] = j["line"]
        assert line["method"] == "dpo" and line["format"] == "preference" and line["beta"] == 0.1
        assert line["precompute_ref_log_probs"] is False and line["data"] == "dpo-gsm8k-256.jsonl"
        assert (line["warmup"], line["steps"]) == (1, 2) and len(line["tokens_each"]) == 3
        assert line["tokens_per_s"] > 0 and line["s_per_step"] > 0 and line["peak_reserved_gib"] is None
        # 2 x batch sequences per step, each at most seq real tokens
        assert all(0 < n <= 2 * 2 * 256 for n in line["tokens_each"])
        assert line["fill"] == round(sum(line["tokens_each"][1:]) / 2 / (2 * 2 * 256), 4)
        # policy = reference at the first step: DPO's loss is log 2
        assert abs(line["first_loss"] - 0.693147) < 1e-3 and line["last_loss"] is not None
    nb = lines["nbtune"]
    assert nb["reference"] == "adapter off" and nb["plan_gpu"] == "T4"  # no GPU here: planned for a T4
    assert 0 < nb["plan_reserved_gib"] < nb["plan_peak_gib"] and nb["plan_checkpointing"] == "offload"
    assert lines["trl"]["reference"] in ("ref adapter", "adapter off") and lines["trl"]["trl"]
    # same pairs, same order, same tokenization
    assert r["checks"]["same_tokens"] == {"trl": True} and r["checks"]["first_loss_diff"]["trl"] < 1e-3
    table = (out / path.replace(".json", ".md")).read_text()
    assert "| DPO gsm8k 2×256 fp32 | nbtune.finetune (dpo) |" in table
    assert "| DPO gsm8k 2×256 fp32 | TRL DPOTrainer + peft + bnb |" in table


def test_host_memory_keeps_the_loading_and_training_peaks_apart():
    """The nbtune peer's host-memory listener: memory owned after the first step counts toward the
    training peak, not the loading one (the readings are taken here by hand, not by its thread)."""
    import trainer_nbtune

    host = trainer_nbtune.HostMemory()
    host.sample()  # loading: nothing more than this process holds now
    load = host.peaks["load"][0]
    host({"event": "start"})
    block = bytearray(256 * 2**20)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # touch every page: resident, anonymous
    host.sample()
    del block
    host.end()
    f = host.fields
    assert f["anon_load_peak_gib"] == round(load, 3) and f["file_at_load_peak_gib"] >= 0
    assert f["anon_train_peak_gib"] >= load + 0.24
    assert f["rss_hwm_gib"] >= f["anon_train_peak_gib"] - 0.001 and f["file_at_train_peak_gib"] >= 0
