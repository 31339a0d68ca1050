"""Data pipeline: formats, chat template, responses-only labels, clear errors naming the row."""
import json

import pytest

from nbtune.train.config import DataConfig
from nbtune.train.data import IGNORE_INDEX, DataError, prepare_data, read_file, tokenize_example


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_responses_only_labels_cover_exactly_the_assistant_turns(tokenizer):
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5"},
                {"role": "user", "content": "And 4+4?"}, {"role": "assistant", "content": "8"}]
    ids, labels = tokenize_example(messages, tokenizer, 512, responses_only=True)
    trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained == "2+3 = 5<|im_end|>8<|im_end|>"
    assert tokenizer.decode(ids).count("What is 2+3?") == 1
    ids_all, labels_all = tokenize_example(messages, tokenizer, 512, responses_only=False)
    assert ids_all == ids and labels_all == ids


@pytest.mark.parametrize("row, fmt", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "messages"),
    ({"prompt": "q", "completion": "a"}, "prompt_completion"),
    ({"instruction": "q", "input": "", "output": "a"}, "instruction"),
    ({"question": "q", "answer": "a"}, "qa"),
])
def test_formats_are_detected_and_render_the_same_conversation(tmp_path, tokenizer, row, fmt):
    path = _write_jsonl(tmp_path / "d.jsonl", [row, row])
    data = prepare_data(DataConfig(source=str(path), eval_split=None), tokenizer, 128)
    assert data.format == fmt
    ids = data.train[0]["input_ids"]
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n")
    trained = [t for t, lab in zip(ids, data.train[0]["labels"]) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "a<|im_end|>"


def test_column_mapping_and_plain_text(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"q": "hello", "a": "world"}])
    cfg = DataConfig(source=str(path), eval_split=None, format="prompt_completion",
                     columns={"prompt": "q", "completion": "a"})
    assert prepare_data(cfg, tokenizer, 64).train.num_rows == 1
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "some plain text"}])
    data = prepare_data(DataConfig(source=str(path), eval_split=None), tokenizer, 64)
    assert data.format == "text" and data.train[0]["labels"] == data.train[0]["input_ids"]


def test_gsm8k_has_train_and_held_out_splits(tokenizer):
    data = prepare_data(DataConfig(source="gsm8k", max_rows=20, eval_rows=10), tokenizer, 512)
    assert data.train.num_rows == 20 and data.eval.num_rows == 10 and data.format == "qa"


def test_bad_data_errors_name_the_problem(tmp_path, tokenizer):
    def err(path, **kw):
        with pytest.raises(DataError) as e:
            prepare_data(DataConfig(source=str(path), eval_split=None, **kw), tokenizer, 64)
        return str(e.value)

    assert "does not exist" in err(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in err(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    assert "line 2: malformed JSON" in err(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert "line 2: not UTF-8" in err(tmp_path / "latin1.jsonl")
    _write_jsonl(tmp_path / "cols.jsonl", [{"foo": 1}])
    assert "cannot tell the format" in err(tmp_path / "cols.jsonl")
    _write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "wizard", "content": "x"}]}])
    assert "row 1" in err(tmp_path / "roles.jsonl") and "wizard" in err(tmp_path / "roles.jsonl")
    _write_jsonl(tmp_path / "miss.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2"}])
    assert "row 2: missing column 'answer'" in err(tmp_path / "miss.jsonl", format="qa")
    _write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "completion": "a"}] * 3)
    msg = err(tmp_path / "long.jsonl")
    assert "all 3 rows were dropped" in msg and "max_seq_length=64" in msg


def test_read_json_list(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert len(read_file(tmp_path / "d.json")) == 2
