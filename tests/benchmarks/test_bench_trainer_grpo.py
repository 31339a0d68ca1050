"""benchmarks/trainer.py's GRPO rows without a GPU: the rows and their alias, the prompt data and
both trainers reading it, the TRL peers' reward against nbtune's, the peers' configs, the sampling's
clock and summary, the GRPO table, and the rows end to end on a tiny model (CPU, fp32): nbtune's
peer with Unsloth's reported as skipped where it is not installed, then TRL's peer."""
import importlib.util
import json
import os
import sys
import types

import pytest

from bench_scripts import BENCH, REPO, load_script

sys.path.insert(0, os.path.join(BENCH, "peers"))
import trainer_common  # noqa: E402
import trainer_trl_grpo  # noqa: E402

trainer = load_script("nbtune_bench_trainer", os.path.join(BENCH, "trainer.py"))
report = trainer.report
data = sys.modules["trainer_data"]  # the module trainer.py imported (one copy of its classes)


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------
def test_grpo_rows_and_alias(capsys):
    rows = trainer.select_rows("grpo")
    assert [(r.id, r.data, r.batch, r.seq, r.dtype, r.packing, r.t4, r.method) for r in rows] == [
        ("grpo-gsm8k-1x512-bf16", "gsm8k", 1, 512, "bfloat16", False, False, "grpo"),
        ("grpo-gsm8k-2x512-bf16", "gsm8k", 2, 512, "bfloat16", False, False, "grpo"),
        ("grpo-gsm8k-1x512-fp16", "gsm8k", 1, 512, "float16", False, False, "grpo")]
    row = trainer.parse_row("grpo-gsm8k-4x384-fp32")
    assert (row.id, row.batch, row.seq, row.dtype, row.method) == ("grpo-gsm8k-4x384-fp32", 4, 384, "float32", "grpo")
    assert row.label() == "GRPO gsm8k 4×384 fp32" and row.data_key == "grpo-gsm8k-384"
    assert not row.same_batches  # each peer samples its own completions: no same-batch check
    assert trainer.parse_row("dpo-gsm8k-1x1024-bf16").same_batches
    assert [r.id for r in trainer.select_rows("grpo-*-bf16")] == ["grpo-gsm8k-1x512-bf16", "grpo-gsm8k-2x512-bf16"]
    assert [r.id for r in trainer.select_rows("all")] == trainer.MAIN_ROWS + trainer.T4_ROWS  # SFT only, as before
    assert [r.id for r in trainer.select_rows("dpo-*-1x1024-*")] == ["dpo-gsm8k-1x1024-bf16", "dpo-gsm8k-1x1024-fp16"]
    for bad in ("grpo-gsm8k-2x512", "grpo-text-2x512-bf16", "grpo-gsm8k-2x512-bf16-packed", "grpo-gsm8k-0x512-bf16",
                "grpo-gsm8k-1x3-bf16", "grpo-gsm8k-1x512-fp8"):
        with pytest.raises(ValueError, match="grpo|GRPO|dtype|batch"):
            trainer.parse_row(bad)
    assert trainer.main(["--list", "--rows", "grpo,dpo-gsm8k-1x1024-bf16", "--peers", "nbtune,trl"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("grpo-gsm8k-1x512-bf16")
    assert "GRPO gsm8k 2×512 bf16: nbtune,trl" in out[1] and out[3].startswith("dpo-gsm8k-1x1024-bf16")
    # each peer's command for a GRPO row
    assert [os.path.basename(trainer.GRPO_CMD[p][0]) for p in ("nbtune", "unsloth", "trl")] == [
        "trainer_nbtune.py", "trainer_trl_grpo.py", "trainer_trl_grpo.py"]
    assert trainer.GRPO_CMD["nbtune"][1:] == ["--method", "grpo"]


# ------------------------------------------------------------------------------------------------
# the prompt data, nbtune's reader, the TRL peers' reward
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets():
    return data.resolve_assets(None)


def nbtune_config(args_list):
    """nbtune's config for a GRPO run of the nbtune peer (its argument list), validated as nbtune does."""
    from nbtune.train.config import Config

    nb = load_script("nbtune_bench_trainer_nbtune", os.path.join(BENCH, "peers", "trainer_nbtune.py"))
    args = trainer_common.parse_args(args_list, methods=trainer_common.METHODS)
    return Config.model_validate(nb.finetune_config(args, "prompt"))


def test_prompt_data_fits_the_budget_and_nbtune_reads_all_of_it(tmp_path, assets):
    from nbtune.train.grpo_data import GSM8K_INSTRUCTION, prompt_ids, tokenize_prompts

    info = data.write_prompt_data(str(tmp_path), *assets, seq=256, rows=12)
    assert info["path"] == str(tmp_path / "grpo-gsm8k-256.jsonl") and info["rows"] == 12
    assert info["max_prompt_tokens"] == 128 and info["max"] <= 128 and info["min"] > 0
    rows = [json.loads(line) for line in open(info["path"])]
    gsm8k = data.gsm8k_rows(assets[1])
    answers = {r["question"]: r["answer"] for r in gsm8k}
    for row in rows:
        (turn,) = row["prompt"]  # chat form: one user turn, the question then nbtune's GSM8K instruction
        question, _, instruction = turn["content"].partition("\n\n")
        assert turn["role"] == "user" and instruction == GSM8K_INSTRUCTION
        assert row["answer"] == answers[question] and "####" in row["answer"]
    # the questions that do not fit are passed over, the others kept in GSM8K's order
    order = [r["question"] for r in gsm8k]
    picked = [order.index(r["prompt"][0]["content"].partition("\n\n")[0]) for r in rows]
    assert picked == sorted(picked) and picked[-1] > 11
    # nbtune's reader keeps every prompt (all fit max_seq_length - max_completion_length), adds no
    # instruction to a local file's prompts, and counts the lengths trainer_data counted
    cfg = nbtune_config(["--model", assets[0], "--data", info["path"], "--batch", "1", "--seq", "256",
                         "--dtype", "float32", "--method", "grpo", "--out", str(tmp_path / "run")])
    tok = data.load_tokenizer(assets[0])
    dataset, lengths, dropped = tokenize_prompts(rows, tok, cfg, "test")
    assert not dropped and dataset["prompt"] == [r["prompt"] for r in rows] and dataset["answer"] == [
        r["answer"] for r in rows]
    assert lengths == [data.prompt_length(tok, r["prompt"]) for r in rows]
    assert lengths == [len(prompt_ids(r["prompt"], tok)) for r in rows]
    assert info["tokens"] == sum(lengths)
    with pytest.raises(ValueError, match="fits"):
        data.write_prompt_data(str(tmp_path), *assets, seq=64, rows=2)  # no GSM8K prompt has 32 tokens


def test_the_trl_peers_reward_is_nbtunes_correctness():
    from nbtune.train.rewards import correctness

    answers = ["She has 3 + 4 = 7 apples.\n#### 7", "#### 1,000", "#### 5", "#### 0.5", "#### -3", "12", "#### 72",
               "no number", None, "#### 9.50", "#### 3"]
    completions = ["So the answer is\n#### 7", "It costs $1000.00 in total.", "5 apples, then 6 pears", ".5",
                   "#### -3.0", "12 cats and 12 dogs\n####", "#### seventy-two, or 72.", "#### 4", "#### 9",
                   "the total is 9.5", "#### 30"]
    as_chat = [[{"role": "assistant", "content": c}] for c in completions]
    for form in (completions, as_chat):
        ours = correctness(prompts=[None] * len(form), completions=form, answer=answers)
        theirs = trainer_trl_grpo.gsm8k_correctness(prompts=[None] * len(form), completions=form, answer=answers)
        assert theirs == ours
    assert ours == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, None, None, 1.0, 0.0]  # both rules, not only agreement
    assert trainer_trl_grpo.gsm8k_correctness([None], ["#### 2"]) == [None]  # no answer column: not scored


# ------------------------------------------------------------------------------------------------
# the peers' configs: the same run everywhere
# ------------------------------------------------------------------------------------------------
def test_every_peer_runs_the_same_grpo_settings(tmp_path):
    argv = ["--model", "m", "--data", "d.jsonl", "--batch", "2", "--seq", "512", "--dtype", "bfloat16",
            "--out", str(tmp_path)]
    cfg = nbtune_config(argv + ["--method", "grpo"])
    assert (cfg.train.method, cfg.train.batch_size, cfg.train.grad_accum, cfg.model.max_seq_length) == (
        "grpo", 8, 1, 512)  # nbtune's batch counts completions: 2 prompts x 4
    assert (cfg.grpo.num_generations, cfg.grpo.max_completion_length, cfg.grpo.temperature, cfg.grpo.beta,
            cfg.grpo.rewards, cfg.grpo.use_vllm) == (4, 256, 1.0, 0.0, ["correctness"], False)
    assert (cfg.data.format, cfg.data.packing, cfg.lora.r, cfg.train.lr) == ("prompt", False, 16, 2e-4)
    for peer in ("unsloth", "trl"):
        args = trainer_common.parse_args(["--peer", peer] + argv, peers=("unsloth", "trl"), methods=("grpo",))
        config, left_out = trainer_trl_grpo.grpo_config(trainer_trl_grpo.grpo_settings(args, peer))
        assert left_out == []  # every field is one the pinned TRL knows
        assert (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.num_generations,
                config.generation_batch_size, config.max_completion_length) == (8, 1, 4, 8, 256)
        assert (config.temperature, config.top_p, config.top_k, config.beta, config.loss_type, config.use_vllm,
                config.num_iterations, config.learning_rate, config.seed) == (
            1.0, 1.0, 0, 0.0, "dapo", False, 1, 2e-4, 3407)
        assert config.gradient_checkpointing  # TRL's default; the plain peer asks for the non-reentrant kind
        assert config.gradient_checkpointing_kwargs == ({"use_reentrant": False} if peer == "trl" else None)
    with pytest.raises(SystemExit):
        trainer_common.parse_args(argv + ["--packing"], methods=("grpo",))


# ------------------------------------------------------------------------------------------------
# the sampling's clock and summary
# ------------------------------------------------------------------------------------------------
def test_generation_summary_leaves_out_the_warm_up():
    # 3 steps of 4.0 (warm-up), 2.0 and 3.0 s; generation 3.0, 1.0, 2.0 s of 400, 300, 500 completion tokens
    s = trainer_common.summarize_generation([3.0, 1.0, 2.0], [400, 300, 500], [4.0, 2.0, 3.0], 1, 8,
                                            "_generate_single_turn")
    assert s["generation_tokens_per_s"] == round(800 / 3.0, 1) and s["generation_s_per_step"] == 1.5
    assert s["generation_share"] == round(3.0 / 5.0, 4) and s["completion_length_mean"] == 50.0  # 800 / (2 x 8)
    assert s["generation_tokens_each"] == [400, 300, 500] and s["generation_s_each"] == [3.0, 1.0, 2.0]
    assert (s["generation_timed"], s["completions_per_step"]) == ("_generate_single_turn", 8)
    with pytest.raises(ValueError, match="one generation per step"):
        trainer_common.summarize_generation([1.0], [10], [1.0, 1.0], 0, 4, "x")
    with pytest.raises(ValueError, match=r"step\(s\) \[2\]"):
        trainer_common.summarize_generation([1.0, None], [10, None], [1.0, 1.0], 0, 4, "x")
    with pytest.raises(ValueError, match="no completion tokens"):
        trainer_common.summarize_generation([1.0, 1.0], [10, 0], [1.0, 1.0], 1, 4, "x")


class FakeTrainer:
    """What GenerationTimer touches of a GRPOTrainer: its generation method, state and model."""

    def __init__(self, results):
        self.results = results
        self.state = types.SimpleNamespace(global_step=0)
        self.model = types.SimpleNamespace(training=True)
        self.seen = []

    def _generate_single_turn(self, prompt_ids, images, fields, num_generations):
        self.seen.append(prompt_ids)
        return self.results.pop(0), None


def test_the_generation_timer_keeps_what_the_trainer_does():
    trainer_ = FakeTrainer([[[1, 2, 3], [4]], [[5, 6]], [[7]], [[8, 9], [10]]])
    timer = trainer_trl_grpo.GenerationTimer(trainer_)
    assert timer.name == "_generate_single_turn"
    assert trainer_._generate_single_turn([[0]], None, {}, 2) == ([[1, 2, 3], [4]], None)  # its result, unchanged
    trainer_.state.global_step = 1
    trainer_._generate_single_turn([[1]], None, {}, 2)
    trainer_.model.training = False  # an evaluation's generation is not a step's
    trainer_._generate_single_turn([[2]], None, {}, 2)
    trainer_.model.training, trainer_.state.global_step = True, 3
    trainer_._generate_single_turn([[3]], None, {}, 2)
    assert trainer_.seen == [[[0]], [[1]], [[2]], [[3]]]
    seconds, tokens = timer.per_step(4)
    assert tokens == [4, 2, None, 3] and seconds[2] is None
    assert all(s > 0 for s in (seconds[0], seconds[1], seconds[3]))

    class Older:  # a trainer without _generate_single_turn: its _generate, completion ids second
        state, model = types.SimpleNamespace(global_step=0), types.SimpleNamespace(training=True)

        def _generate(self, prompts):
            return [[0]], [[1, 2], [3, 4, 5]]

    older = Older()
    timer = trainer_trl_grpo.GenerationTimer(older)
    older._generate(["p"])
    assert timer.name == "_generate" and timer.per_step(1)[1] == [5]
    with pytest.raises(AttributeError, match="_generate_single_turn"):
        trainer_trl_grpo.GenerationTimer(types.SimpleNamespace())


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def job(peer, status="ok", **line):
    return dict(peer=peer, status=status, detail="" if status == "ok" else "not importable: unsloth",
                line=dict(peer=peer, **line) if status == "ok" else None)


def rec(row_id, results):
    row = trainer.parse_row(row_id)
    out = row.record()
    out["results"] = results
    out["checks"] = trainer.row_checks(results, not row.same_batches)
    return out


def test_grpo_table_shows_generation_beside_the_step_and_memory():
    nb = job("nbtune", tokens_per_s=3000, s_per_step=0.9, fill=0.7, peak_reserved_gib=12.5, generation_tokens_per_s=600,
             generation_share=0.8, completion_length_mean=256, plan_reserved_gib=13.0, first_loss=0.0,
             tokens_each=[10, 12])
    trl = job("trl", tokens_per_s=1500, s_per_step=1.8, fill=0.7, peak_reserved_gib=15.0, generation_tokens_per_s=400,
              generation_share=0.9, completion_length_mean=256, first_loss=0.5, tokens_each=[10, 13],
              generation_timed="_generate")
    grpo = rec("grpo-gsm8k-2x512-bf16", {"nbtune": nb, "unsloth": job("unsloth", "skipped"), "trl": trl})
    assert grpo["checks"] == dict(same_tokens={}, first_loss_diff={})  # sampled completions: no same-batch check
    d = dict(meta=dict(gpu="NVIDIA H100 80GB HBM3", steps=[2, 5],
                       data={"grpo-gsm8k-512": dict(rows=64, min=82, max=205, mean=119.5, tokens=7648)}),
             rows=[grpo, rec("dpo-gsm8k-1x1024-bf16", {"nbtune": job("nbtune", tokens_per_s=5000, s_per_step=0.8,
                                                                      fill=0.7, peak_reserved_gib=20.5)}),
                   rec("text-2x2048-bf16-packed", {"nbtune": job("nbtune", tokens_per_s=9000, s_per_step=0.5,
                                                                  fill=0.9, peak_reserved_gib=6.0)})])
    md = report.run_markdown(d, "20261207-000000")
    lines = md.splitlines()
    assert ("| row | peer | tokens/s | s/step | generation tok/s | gen share | completion | peak reserved GiB | "
            "planned GiB | plan − measured | nbtune speed × | nbtune generation × | status |") in lines
    assert ("| GRPO gsm8k 2×512 bf16 | nbtune.finetune (grpo) | 3,000 | 0.900 | 600 | 80% | 256 | 12.50 | 13.00 | "
            "+0.50 | — | — | ok |") in lines
    assert ("| GRPO gsm8k 2×512 bf16 | TRL GRPOTrainer + peft + bnb | 1,500 | 1.800 | 400 | 90% | 256 | 15.00 | — | — "
            "| 2.00× | 1.50× | ok |") in lines
    assert any(line.startswith("| GRPO gsm8k 2×512 bf16 | Unsloth PatchFastRL + TRL GRPOTrainer |")
               and line.endswith("| skipped: not importable: unsloth |") for line in lines)
    # SFT, then DPO, then GRPO, each under its own heading
    assert md.index("| text 2×2048") < md.index("## DPO") < md.index("## GRPO") < md.index("| GRPO gsm8k")
    assert "grpo-gsm8k-512: 64 prompts of 82-205 tokens (mean 119.5)" in md
    notes = md.split("Notes:")[1]
    assert "generation timed around _generate" in notes and "other token counts" not in notes
    summary = report.summary_text(d)
    grpo_lines = [line for line in summary.splitlines() if line.startswith("grpo-gsm8k-2x512-bf16")]
    assert "gen tok/s     600 ( 80% of the step)" in grpo_lines[0] and "planned 13.00 (+0.50)" in grpo_lines[0]
    assert "gen nbtune×  1.50×" in grpo_lines[2] and "nbtune×  2.00×" in grpo_lines[2]
    lead = "\n".join(report.lead_section([("trainer-20261207-000000.json", d)]))
    assert lead.index("| text 2×2048") < lead.index("### DPO") < lead.index("### GRPO")


# ------------------------------------------------------------------------------------------------
# end to end on the CPU: the real peers, a tiny model, real prompts
# ------------------------------------------------------------------------------------------------
GRPO_ROW = "grpo-gsm8k-1x192-fp32"  # 96-token completions of prompts of at most 96 tokens: quick on a CPU


def run_grpo_row(tiny_model_dir, tmp_path, peers, monkeypatch):
    """The GRPO row through benchmarks/trainer.py (1 warm-up + 1 timed step); the peers import this
    checkout's nbtune. Returns (result document, its markdown table)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["--rows", GRPO_ROW, "--peers", peers, "--steps", "1:1", "--model", str(tiny_model_dir),
            "--text-rows", "2", "--text-tokens", "60:120", "--chat-rows", "4", "--grpo-rows", "8",
            "--out-dir", str(out), "--work", str(work), "--markdown", str(tmp_path / "RESULTS.md"),
            "--python", sys.executable, "--row-timeout", "600"]
    assert trainer.main(argv) == 0
    (path,) = [p for p in os.listdir(out) if p.endswith(".json")]
    return json.loads((out / path).read_text()), (out / path.replace(".json", ".md")).read_text()


def check_grpo_line(line, peer_reward):
    """What every GRPO peer's line holds on the tiny row: 1 x 4 completions per step of at most 96 tokens."""
    assert line["method"] == "grpo" and line["format"] == "prompt" and line["data"] == "grpo-gsm8k-192.jsonl"
    assert (line["num_generations"], line["max_completion_length"], line["beta"], line["temperature"]) == (
        4, 96, 0.0, 1.0)
    assert line["use_vllm"] is False and line["reward"] == peer_reward
    assert (line["warmup"], line["steps"]) == (1, 1) and len(line["step_s_each"]) == len(line["tokens_each"]) == 2
    assert line["tokens_per_s"] > 0 and line["s_per_step"] > 0 and line["peak_reserved_gib"] is None
    # one generation per step, of 4 completions; a step's tokens are their prompts and completions
    assert line["generation_timed"] == "_generate_single_turn" and line["completions_per_step"] == 4
    assert len(line["generation_s_each"]) == len(line["generation_tokens_each"]) == 2
    assert all(0 < n <= 4 * 96 for n in line["generation_tokens_each"])
    assert all(g < t <= 4 * 192 for g, t in zip(line["generation_tokens_each"], line["tokens_each"]))
    assert line["generation_tokens_per_s"] > 0 and line["generation_s_per_step"] > 0
    assert 0 < line["generation_share"] <= 1
    assert line["completion_length_mean"] == round(line["generation_tokens_each"][1] / 4, 1) <= 96
    assert line["fill"] == round(line["tokens_each"][1] / (4 * 192), 4)
    assert line["first_loss"] is not None and line["last_loss"] is not None


@pytest.mark.slow
def test_grpo_row_end_to_end_nbtune_and_unsloth(tiny_model_dir, tmp_path, monkeypatch):
    result, table = run_grpo_row(tiny_model_dir, tmp_path, "nbtune,unsloth", monkeypatch)
    prompts = result["meta"]["data"]["grpo-gsm8k-192"]
    assert prompts["rows"] == 8 and prompts["max"] <= 96 and prompts["max_prompt_tokens"] == 96
    (r,) = result["rows"]
    assert (r["id"], r["method"], r["batch"], r["seq"], r["packing"]) == (GRPO_ROW, "grpo", 1, 192, False)
    if importlib.util.find_spec("unsloth") is None:  # absent here: its GRPO peer is reported as skipped, and why
        assert r["results"]["unsloth"]["status"] == "skipped"
        assert r["results"]["unsloth"]["detail"] == "not importable: unsloth"
    job_ = r["results"]["nbtune"]
    assert job_["status"] == "ok", (job_.get("detail"), job_.get("stderr_tail"))
    line = job_["line"]
    check_grpo_line(line, "correctness")
    # the planner's prediction for this config (no GPU here: planned for a T4), its generation term among its terms
    assert line["plan_gpu"] == "T4" and 0 < line["plan_reserved_gib"] < line["plan_peak_gib"]
    assert "generation" in line["plan_terms"] and line["plan_terms"]["generation"] >= 0
    assert line["dashboard"] == "on" and line["metrics_records"] >= 2
    assert r["checks"] == dict(same_tokens={}, first_loss_diff={})
    assert f"| GRPO gsm8k 1×192 fp32 | nbtune.finetune (grpo) | {line['tokens_per_s']:,} |" in table


@pytest.mark.slow
def test_grpo_row_end_to_end_trl(tiny_model_dir, tmp_path, monkeypatch):
    result, table = run_grpo_row(tiny_model_dir, tmp_path, "trl", monkeypatch)
    (r,) = result["rows"]
    job_ = r["results"]["trl"]
    assert job_["status"] == "ok", (job_.get("detail"), job_.get("stderr_tail"))
    line = job_["line"]
    check_grpo_line(line, "gsm8k_correctness")
    assert line["trl"] and "grpo_config_left_out" not in line and line["gradient_checkpointing"] is True
    assert f"| GRPO gsm8k 1×192 fp32 | TRL GRPOTrainer + peft + bnb | {line['tokens_per_s']:,} |" in table
