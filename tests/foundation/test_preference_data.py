"""Preference rows for DPO / ORPO: formats (text, chat turns, an implicit prompt), tokenization
(the reply tokens follow the prompt's), dropped pairs, clear errors naming the row and the column,
the config's checks across sections and the dry run's counts."""
import json

import pytest

import nbtune
from nbtune.train.config import ConfigError, build_config
from nbtune.train.data import DataError, apply_chat_template_choice
from nbtune.train.preference_data import (check_rows, pair_counts, prepare_preference_data, to_pair,
                                          tokenize_pair)

USER = {"role": "user", "content": "What is 2+2?"}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    apply_chat_template_choice(tok, None)
    return tok


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_text_and_chat_rows_give_the_same_pair():
    text = to_pair({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}, "row 1")
    chat = to_pair({"prompt": [USER], "chosen": [GOOD], "rejected": BAD}, "row 1")  # a single turn is a reply too
    assert text == chat == ([USER], [GOOD], [BAD])
    sharegpt = to_pair({"prompt": [{"from": "human", "value": "What is 2+2?"}], "chosen": [{"from": "gpt", "value": "4"}],
                        "rejected": [{"from": "gpt", "value": "5"}]}, "row 1")
    assert sharegpt == text
    with_system = to_pair({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}, "row 1", system_prompt="Be brief.")
    assert with_system[0] == [{"role": "system", "content": "Be brief."}, USER]


def test_an_implicit_prompt_is_split_off_the_shared_turns():
    pair = to_pair({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "row 1")
    assert pair == ([USER], [GOOD], [BAD])
    # shared assistant turns stay with the replies' context only up to the last user turn
    more = [USER, GOOD, {"role": "user", "content": "and 3+3?"}]
    assert to_pair({"chosen": more + [{"role": "assistant", "content": "6"}],
                    "rejected": more + [{"role": "assistant", "content": "7"}]}, "row 1")[0] == more


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "q", "chosen": 4, "rejected": "5"}, "row 3: column 'chosen' must be text or a list of {role, content}"),
    ({"prompt": "q", "rejected": "5"}, "row 3: missing column 'chosen'"),
    ({"prompt": [USER, GOOD], "chosen": "4", "rejected": "5"}, "column 'prompt' ends with an assistant turn"),
    ({"prompt": "q", "chosen": [USER], "rejected": "5"}, "column 'chosen' starts with a 'user' turn"),
    ({"prompt": "q", "chosen": [{"role": "robot", "content": "4"}], "rejected": "5"}, "has role 'robot'"),
    ({"chosen": "4", "rejected": "5"}, "no 'prompt' column; with text replies the prompt must be given"),
    ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]}, "do not start with the same"),
])
def test_bad_rows_name_the_row_and_the_column(row, needle):
    with pytest.raises(DataError) as err:
        to_pair(row, "data.jsonl row 3")
    assert needle in str(err.value)


def test_rows_without_chosen_and_rejected_say_how_to_map_columns(tmp_path):
    cfg = build_config(data={"source": str(write(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}]))},
                       train={"method": "dpo"})
    with pytest.raises(DataError) as err:
        check_rows([{"question": "q", "answer": "a"}], cfg.data, "d.jsonl")
    text = str(err.value)
    assert "prompt, chosen and rejected" in text and "['answer', 'question']" in text and "data.columns" in text


def test_reply_tokens_follow_the_prompt_tokens(tokenizer):
    prompt, chosen, rejected = tokenize_pair([USER], [GOOD], [BAD], tokenizer)
    whole = tokenizer(tokenizer.apply_chat_template([USER, GOOD], tokenize=False), add_special_tokens=False)["input_ids"]
    assert prompt + chosen == whole
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(chosen) == "4<|im_end|>\n" and tokenizer.decode(rejected) == "5<|im_end|>\n"


def test_pairs_are_tokenized_split_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": f"What is {i}+{i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(18)]
    rows += [{"prompt": "same", "chosen": "x", "rejected": "x"}, {"prompt": "empty", "chosen": " ", "rejected": "y"}]
    cfg = build_config(data={"source": str(write(tmp_path / "pairs.jsonl", rows)), "eval_split": None},
                       train={"method": "dpo"})
    data = prepare_preference_data(cfg.data, tokenizer, 256)
    assert data.format == "preference" and data.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert data.eval is None and data.train.num_rows == 18
    assert data.dropped == {"chosen and rejected are the same": 1, "empty reply": 1}
    held = build_config(data={"source": str(write(tmp_path / "good.jsonl", rows[:18])), "eval_split": 0.1},
                        train={"method": "dpo"})
    split = prepare_preference_data(held.data, tokenizer, 256)
    assert (split.train.num_rows, split.eval.num_rows) == (16, 2)
    counts = pair_counts(data)
    p, c, r = (sum(map(len, data.train[k])) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert counts == {"pairs": data.train.num_rows, "tokens": 2 * p + c + r, "scored": c + r,
                      "longest": counts["longest"]}
    # a prompt that fills max_seq_length leaves nothing to score: dropped, said why
    short = prepare_preference_data(cfg.data, tokenizer, 40)
    with pytest.raises(DataError, match="raise model.max_seq_length"):
        prepare_preference_data(cfg.data, tokenizer, 8)
    assert short.train.num_rows == data.train.num_rows


def test_the_config_refuses_what_preference_training_cannot_do():
    with pytest.raises(ConfigError, match="data.packing: false"):
        build_config(train={"method": "dpo"}, data={"packing": True})
    with pytest.raises(ConfigError, match="reads preference rows"):
        build_config(train={"method": "orpo"}, data={"format": "messages"})
    with pytest.raises(ConfigError, match="is for train.method dpo or orpo"):
        build_config(data={"format": "preference"})
    assert build_config(train={"method": "dpo"}).train.beta == 0.1
    assert "method" in nbtune.Config.reference() and "beta" in nbtune.Config.reference()


def test_dry_run_counts_pairs_and_tokens(smollm2_dir, tmp_path):
    report = nbtune.finetune({"model": {"name": "smollm2-135m-instruct", "max_seq_length": 512},
                              "data": {"source": "gsm8k-preferences", "max_rows": 12, "eval_rows": 4},
                              "train": {"method": "dpo", "max_steps": 3, "batch_size": 2, "grad_accum": 2},
                              "output": {"dir": str(tmp_path / "run")}}, dry_run=True)
    assert report.format == "preference" and report.unit == "pairs"
    assert (report.train_rows, report.eval_rows, report.steps) == (12, 4, 3)
    assert report.epochs == pytest.approx(1.0)
    assert report.trainable_tokens < report.train_tokens
    text = report.summary()
    assert "train pairs: 12" in text and "eval pairs: 4" in text and "3 x 4 pairs (batch 2 x grad_accum 2)" in text
    assert "#### " in report.sample and not (tmp_path / "run").exists()  # nothing written
