"""GRPO without a model: the grpo config section and its checks across sections, the built-in
rewards on real GSM8K answers, ``module:function`` rewards, prompt rows (text, chat, GSM8K's
question / answer) with clear errors naming the row and the column, and the dry run's counts."""
import json
import textwrap

import pytest

import nbtune
from nbtune.train.config import ConfigError, build_config
from nbtune.train.data import DataError, apply_chat_template_choice
from nbtune.train.grpo_data import (GSM8K_INSTRUCTION, check_rows, prepare_grpo_data, prompt_ids, steps_of,
                                    to_prompt)
from nbtune.train.rewards import correctness, final_number, format_reward, load_rewards

USER = {"role": "user", "content": "What is 2+2?"}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    apply_chat_template_choice(tok, None)
    return tok


@pytest.fixture(scope="module")
def gsm8k_rows():
    from nbtune.assets import dataset_split_path

    with open(dataset_split_path("gsm8k", "train"), encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(200))]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def grpo(**sections):
    return build_config({"train": {"method": "grpo", **sections.pop("train", {})}, **sections})


# ----------------------------------------------------------------------------- config
def test_the_grpo_section_has_trls_defaults_and_round_trips():
    cfg = grpo()
    g = cfg.grpo
    assert (g.num_generations, g.max_completion_length, g.temperature, g.beta) == (4, 256, 1.0, 0.0)
    assert g.rewards == ["correctness", "format"] and g.use_vllm == "auto"
    assert build_config(cfg.to_yaml()) == cfg
    assert build_config(build_config({}).to_yaml()).train.method == "sft"  # a default grpo section is no error
    assert grpo(grpo={"rewards": "format"}).grpo.rewards == ["format"]  # one name alone is a list of one
    reference = nbtune.train.config.config_reference()
    assert "grpo:" in reference and "num_generations" in reference


@pytest.mark.parametrize("sections, words", [
    ({"grpo": {"rewards": ["correctnes"]}}, ["grpo.rewards", "'correctnes'", "correctness, format", "module:function"]),
    ({"grpo": {"rewards": ["no_such_module_xyz:f"]}}, ["grpo.rewards", "importing 'no_such_module_xyz'", "PYTHONPATH"]),
    ({"grpo": {"rewards": ["json:no_such_function"]}}, ["grpo.rewards", "has no 'no_such_function'"]),
    ({"grpo": {"rewards": ["json:decoder"]}}, ["grpo.rewards", "not a function"]),
    ({"grpo": {"rewards": ["format", "format"]}}, ["grpo.rewards", "listed twice"]),
    ({"grpo": {"rewards": []}}, ["grpo.rewards", "at least one"]),
    ({"grpo": {"num_generations": 1}}, ["grpo.num_generations", ">= 2"]),
    ({"train": {"batch_size": 3, "grad_accum": 1}},
     ["train.batch_size x train.grad_accum = 3", "grpo.num_generations (4)", "multiple of 4"]),
    ({"model": {"max_seq_length": 200}}, ["grpo.max_completion_length (256)", "model.max_seq_length (200)"]),
    ({"data": {"packing": True}}, ["data.packing: false"]),
    ({"data": {"format": "qa"}}, ["prompt rows", "data.format: auto (or prompt)"]),
])
def test_bad_grpo_settings_name_the_field_and_the_fix(sections, words):
    with pytest.raises(ConfigError) as e:
        grpo(**sections)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_grpo_settings_on_another_method_and_the_prompt_format_elsewhere_are_errors():
    with pytest.raises(ConfigError, match="grpo.num_generations set, but train.method is 'sft'"):
        build_config({"grpo": {"num_generations": 8}})
    with pytest.raises(ConfigError, match="data.format 'prompt'.*train.method grpo"):
        build_config({"data": {"format": "prompt"}})


def test_a_reward_without_kwargs_is_refused_with_the_signature_to_write(tmp_path, monkeypatch):
    (tmp_path / "strict_rewards.py").write_text("def strict(prompts, completions):\n    return [0.0] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"takes no \*\*kwargs.*def strict\(prompts, completions, \*\*kwargs\)"):
        grpo(grpo={"rewards": ["strict_rewards:strict"]})


def test_a_module_in_the_working_folder_is_found(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards_mod.py").write_text(textwrap.dedent("""
        def short(prompts, completions, **kwargs):
            return [-len(c) for c in completions]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    cfg = grpo(grpo={"rewards": ["format", "cwd_rewards_mod:short"]})
    funcs = load_rewards(cfg.grpo.rewards)
    assert funcs[0] is format_reward and funcs[1](prompts=["p"], completions=["abc"]) == [-3]


# ----------------------------------------------------------------------------- rewards
def test_correctness_on_real_gsm8k_answers(gsm8k_rows):
    rows = gsm8k_rows
    answers = [r["answer"] for r in rows]
    finals = [a.rpartition("####")[2].strip() for a in answers]
    # the worked solution itself is correct; its final line alone too; and a reply ending in prose with the number
    assert correctness(None, answers, answer=answers) == [1.0] * len(rows)
    assert correctness(None, [f"#### {f}" for f in finals], answer=answers) == [1.0] * len(rows)
    assert correctness(None, [f"So the answer is {f}." for f in finals], answer=answers) == [1.0] * len(rows)
    # chat-form completions (TRL's form for chat prompts) read the same
    chats = [[{"role": "assistant", "content": a}] for a in answers]
    assert correctness(None, chats, answer=answers) == [1.0] * len(rows)
    # another row's answer is wrong unless the two happen to share the final number
    shifted = answers[1:] + answers[:1]
    expect = [1.0 if final_number(a) == final_number(b) else 0.0 for a, b in zip(shifted, answers)]
    assert correctness(None, shifted, answer=answers) == expect and expect.count(0.0) > 150
    # gsm8k-preferences' rejected replies (only the final number changed) are wrong, all of them
    from nbtune.assets.preferences import wrong_final

    assert correctness(None, [wrong_final(a, i) for i, a in enumerate(answers)], answer=answers) == [0.0] * len(rows)


def test_numbers_compare_as_numbers_and_rows_without_an_answer_are_unscored():
    assert correctness(None, ["#### 1000", "#### $5.00", "#### -3", "no number", "12 then #### 7"],
                       answer=["#### 1,000", "5", "#### -3", "#### 4", "#### 12"]) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert correctness(None, ["#### 4"], answer=[None]) == [None]
    assert final_number("no digits here") is None


def test_format_on_real_gsm8k_answers(gsm8k_rows):
    answers = [r["answer"] for r in gsm8k_rows]
    assert format_reward(None, answers) == [1.0] * len(answers)  # every GSM8K solution ends with '#### N'
    # the final line missing, or not last, or not a number
    heads = [a.rpartition("####")[0] for a in answers]
    assert format_reward(None, heads) == [0.0] * len(answers)
    assert format_reward(None, ["#### 12\nThat is all.", "#### twelve", "", "####12 \n\n", "#### 1,200.50"]) \
        == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert format_reward.__name__ == "format"  # logged by TRL as rewards/format/mean


# ----------------------------------------------------------------------------- data
def test_text_chat_and_question_rows_give_the_same_prompt():
    assert to_prompt({"prompt": "What is 2+2?", "answer": 4}, "prompt", "row 1") == ([USER], "4")
    assert to_prompt({"prompt": [{"from": "human", "value": "What is 2+2?"}]}, "prompt", "row 1") == ([USER], None)
    assert to_prompt({"question": "What is 2+2?", "answer": "#### 4"}, "question", "row 1") == ([USER], "#### 4")
    turns, _ = to_prompt({"prompt": "What is 2+2?"}, "prompt", "row 1", system_prompt="Be brief.",
                         instruction="End with #### N.")
    assert turns == [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is 2+2?\n\nEnd with #### N."}]


@pytest.mark.parametrize("rows, words", [
    ([{"text": "hello"}], ["train.method grpo reads prompt rows", "['text']", "data.columns"]),
    ([{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}], ["row 2", "missing column 'prompt'"]),
    ([{"prompt": 3, "answer": "1"}], ["row 1", "column 'prompt' must be text or a list"]),
    ([{"prompt": [USER, {"role": "assistant", "content": "4"}], "answer": "4"}],
     ["row 1", "ends with an assistant turn"]),
    ([{"prompt": [{"role": "robot", "content": "x"}], "answer": "1"}], ["row 1", "role 'robot'"]),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], ["row 2", "no 'answer'", "'correctness' reward",
                                                         "grpo.rewards"]),
    ([{"prompt": "a", "answer": ["1"]}], ["row 1", "column 'answer' must be text or a number"]),
])
def test_bad_rows_name_the_row_and_the_column(tmp_path, rows, words):
    cfg = grpo(data={"source": str(write(tmp_path / "p.jsonl", rows))})
    with pytest.raises(DataError) as e:
        check_rows(rows, cfg, str(tmp_path / "p.jsonl"))
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_rows_without_answers_train_with_rewards_that_need_none(tmp_path, tokenizer):
    path = write(tmp_path / "p.jsonl", [{"prompt": f"Say {i}"} for i in range(8)])
    cfg = grpo(data={"source": str(path), "eval_split": None}, grpo={"rewards": ["format"]})
    data = prepare_grpo_data(cfg, tokenizer)
    assert data.train.column_names == ["prompt"] and data.train.num_rows == 8 and data.format == "prompt"


def test_gsm8k_works_as_it_is_with_its_instruction(tokenizer):
    cfg = grpo(data={"source": "gsm8k", "max_rows": 16, "eval_rows": 4})
    data = prepare_grpo_data(cfg, tokenizer)
    assert data.train.num_rows == 16 and data.eval.num_rows == 4
    first = data.train[0]
    assert first["prompt"][-1]["content"].endswith(GSM8K_INSTRUCTION) and first["answer"].split("####")[-1].strip()
    assert data.prompt_tokens[0] == len(prompt_ids(first["prompt"], tokenizer))
    # without data.eval_rows, 32 held-out prompts (each costs num_generations completions, before and after)
    capped = prepare_grpo_data(grpo(data={"source": "gsm8k", "max_rows": 16}), tokenizer)
    assert capped.eval.num_rows == 32 and "data.eval_rows unset: 32 of the 319" in capped.eval_note
    # a system prompt of the user's replaces the instruction
    own = prepare_grpo_data(grpo(data={"source": "gsm8k", "max_rows": 16, "system_prompt": "Think."}), tokenizer)
    assert own.train[0]["prompt"][0] == {"role": "system", "content": "Think."}
    assert GSM8K_INSTRUCTION not in own.train[0]["prompt"][-1]["content"]


def test_prompts_too_long_for_a_completion_are_dropped_and_too_few_prompts_is_an_error(tmp_path, tokenizer):
    rows = [{"prompt": "word " * (100 if i % 2 else 1), "answer": "1"} for i in range(16)]
    cfg = grpo(model={"max_seq_length": 128}, grpo={"max_completion_length": 64},
               data={"source": str(write(tmp_path / "p.jsonl", rows)), "eval_split": None})
    data = prepare_grpo_data(cfg, tokenizer)
    assert data.train.num_rows == 8 and data.dropped == {"prompt over max_seq_length - max_completion_length = 64 "
                                                         "tokens": 8}
    few = grpo(data={"source": str(write(tmp_path / "few.jsonl", rows[:1])), "eval_split": None},
               train={"batch_size": 4, "grad_accum": 2})
    with pytest.raises(DataError, match=r"1 prompts, but one step takes 2 .*lower train.batch_size"):
        prepare_grpo_data(few, tokenizer)


def test_steps_count_prompts_per_step_and_whole_batches():
    cfg = grpo(train={"batch_size": 4, "grad_accum": 2, "max_steps": None, "epochs": 1})  # 8 completions: 2 prompts
    assert steps_of(cfg, 16) == (8, 1.0)
    assert steps_of(cfg, 17) == (8, 1.0)  # TRL's sampler drops the last, incomplete batch of prompts
    assert steps_of(grpo(train={"batch_size": 4, "grad_accum": 2, "max_steps": 3}), 16) == (3, 3 / 8)
    assert steps_of(cfg, 16, world=2) == (4, 1.0)


def test_dry_run_reports_prompts_prompt_tokens_and_steps(tmp_path, smollm2_dir):
    rows = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(20)]
    path = write(tmp_path / "p.jsonl", rows)
    report = nbtune.finetune({
        "model": {"name": str(smollm2_dir), "max_seq_length": 512},
        "data": {"source": str(path), "eval_split": None},
        "train": {"method": "grpo", "batch_size": 4, "grad_accum": 2, "max_steps": None, "epochs": 2},
        "output": {"dir": str(tmp_path / "out")}}, dry_run=True)
    assert report.unit == "prompts" and report.train_rows == 20 and report.format == "prompt"
    assert report.steps == 20 and report.epochs == 2.0  # 2 prompts per step, 10 steps an epoch
    assert report.train_tokens > 20 * 5 and report.longest < 100
    text = report.summary()
    assert "train prompts: 20" in text and "prompt tokens:" in text and "trained on" not in text
    assert "steps: 20 x 8 completions (2 prompts x 4 generations; batch 4 x grad_accum 2) = 2.00 epochs" in text
    assert "scored by correctness, format" in text and "not in it yet" in text
    with pytest.raises(DataError, match="train.method grpo reads prompt rows"):  # checked before anything loads
        nbtune.finetune({"model": {"name": str(smollm2_dir)}, "train": {"method": "grpo"},
                         "data": {"source": str(write(tmp_path / "t.jsonl", [{"text": "x"}]))},
                         "output": {"dir": str(tmp_path / "out2")}}, dry_run=True)


def test_vllm_is_off_on_a_cpu():
    import torch

    from nbtune.train.grpo import vllm_choice

    assert vllm_choice("auto", torch.device("cpu")) is False
    assert vllm_choice(False, torch.device("cpu")) is False
    with pytest.raises(ConfigError, match="grpo.use_vllm: true.*CPU"):
        vllm_choice(True, torch.device("cpu"))
