"""data.packing: whole documents best-fit-decreasing (or, with "split", end to end and cut where a
micro-batch is full) into micro-batches of batch_size x max_seq_length tokens, measured with the
embedded model's real tokenizer on GSM8K chat rows and on long plain-text rows made from real text."""
import json
import random

import pytest

from nbtune.train.config import DataConfig
from nbtune.train.data import prepare_data
from nbtune.train.packing import best_fit_decreasing, pack_dataset, packing_strategy, split_end_to_end


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _check_packed(data, packed, stats, batch_size, max_len):
    """Every document once, whole, in order of its tokens and labels; no micro-batch over budget."""
    docs = sorted(zip(map(tuple, data.train["input_ids"]), map(tuple, data.train["labels"])))
    got = []
    for ids, labels, lengths in zip(packed["input_ids"], packed["labels"], packed["seq_lengths"]):
        assert len(ids) == len(labels) == sum(lengths) <= batch_size * max_len
        assert all(0 < n <= max_len for n in lengths)
        start = 0
        for n in lengths:
            got.append((tuple(ids[start:start + n]), tuple(labels[start:start + n])))
            start += n
    assert sorted(got) == docs
    assert stats.documents == len(docs) and stats.micro_batches == packed.num_rows
    assert stats.tokens == sum(len(d[0]) for d in docs)
    assert stats.fill == pytest.approx(stats.tokens / (packed.num_rows * batch_size * max_len))


def test_best_fit_decreasing_puts_each_item_in_the_tightest_bin():
    # 7 opens a bin (room 3), 5 opens one (room 5), 4 goes to the room 5, 3 fills the room 3, 2 opens one
    bins = best_fit_decreasing([3, 5, 2, 7, 4], 10)
    assert [[[3, 5, 2, 7, 4][i] for i in b] for b in bins] == [[7, 3], [5, 4], [2]]
    lengths = [random.Random(1).randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    with pytest.raises(ValueError, match="300 tokens"):
        best_fit_decreasing([300], 256)


def test_gsm8k_chat_rows_fill_micro_batches(tokenizer):
    """GSM8K chat rows (~220 tokens) with responses-only labels, max_seq_length 2048, batch 2."""
    data = prepare_data(DataConfig(source="gsm8k", eval_split=None), tokenizer, 2048)
    assert data.truncated == 0 and data.train.num_rows >= 500
    packed, stats = pack_dataset(data.train, batch_size=2, max_seq_length=2048)
    _check_packed(data, packed, stats, 2, 2048)
    print(f"GSM8K chat ({data.train.num_rows} rows, {stats.tokens / stats.documents:.0f} tokens each): "
          f"{stats.line()}")
    assert stats.fill >= 0.95


def _long_text_rows(tokenizer, n_rows, low, high, seed=0):
    """Plain-text rows of low..high tokens (the real tokenizer's count) cut from GSM8K's real text."""
    from nbtune.assets import dataset_split_path

    rows = [json.loads(line) for line in dataset_split_path("gsm8k", "train").read_text().splitlines()]
    stream = tokenizer("\n\n".join(f"{r['question']}\n{r['answer']}" for r in rows),
                       add_special_tokens=False)["input_ids"]
    rng, out, at = random.Random(seed), [], 0
    for _ in range(n_rows):
        n = rng.randint(low, high)
        if at + n > len(stream):
            at = 0
        out.append({"text": tokenizer.decode(stream[at:at + n])})
        at += n
    return out


@pytest.mark.parametrize("batch_size, least", [(4, 0.95), (8, 0.95), (2, 0.85)])
def test_long_text_rows_fill_micro_batches(tmp_path, tokenizer, batch_size, least):
    """Rows of 1,024-2,048 tokens, max_seq_length 2048. A row of over 1,024 tokens leaves room for
    no other in a 2,048-token row, so only a budget of several rows packs them tight: at batch 2 the
    whole-document ceiling is about 0.90 (two or three documents per 4,096 tokens)."""
    path = tmp_path / "long.jsonl"
    rows = _long_text_rows(tokenizer, 400, 1024, 2040)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = prepare_data(DataConfig(source=str(path), eval_split=None, responses_only=False), tokenizer, 2048)
    lengths = [len(x) for x in data.train["input_ids"]]
    assert data.format == "text" and len(lengths) == 400
    assert min(lengths) >= 1000 and max(lengths) <= 2048
    packed, stats = pack_dataset(data.train, batch_size=batch_size, max_seq_length=2048)
    _check_packed(data, packed, stats, batch_size, 2048)
    print(f"long text rows ({sum(lengths) / len(lengths):.0f} tokens each), batch {batch_size}: {stats.line()}")
    assert stats.fill >= least


def test_rows_over_max_seq_length_are_truncated_and_counted(tmp_path, tokenizer):
    rows = _long_text_rows(tokenizer, 6, 300, 500, seed=3)
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    whole = prepare_data(DataConfig(source=str(path), eval_split=None, responses_only=False), tokenizer, 4096)
    full = [len(x) for x in whole.train["input_ids"]]
    data = prepare_data(DataConfig(source=str(path), eval_split=None, responses_only=False), tokenizer, 400)
    assert data.truncated == sum(n > 400 for n in full) > 0
    for cut, kept in zip(data.train["input_ids"], whole.train["input_ids"]):
        assert cut == kept[:400]  # the first max_seq_length tokens
    packed, stats = pack_dataset(data.train, batch_size=2, max_seq_length=400)
    _check_packed(data, packed, stats, 2, 400)


def test_split_end_to_end_cuts_where_a_micro_batch_is_full():
    assert split_end_to_end([5, 7, 3, 9], 8) == [[(0, 0, 5), (1, 0, 3)], [(1, 3, 7), (2, 0, 3), (3, 0, 1)],
                                                 [(3, 1, 9)]]
    assert split_end_to_end([8, 2], 8) == [[(0, 0, 8)], [(1, 0, 2)]]  # an exact fit is not cut
    assert split_end_to_end([20], 8) == [[(0, 0, 8)], [(0, 8, 16)], [(0, 16, 20)]]
    assert [packing_strategy(v) for v in (True, "whole", "split", False, None)] == ["whole", "whole", "split",
                                                                                     None, None]
    with pytest.raises(ValueError, match="'halves'"):
        pack_dataset(None, 1, 8, strategy="halves")


@pytest.mark.parametrize("batch_size", [1, 2])
def test_split_packing_fills_every_micro_batch_of_long_text_rows(tmp_path, tokenizer, batch_size):
    """The rows whole packing cannot fill (1,024-2,048 tokens, max_seq_length 2048): laid end to end
    and cut, every micro-batch but the last is full, and the tokens and labels are the documents'
    own, in order, each piece at most max_seq_length long."""
    path = tmp_path / "long.jsonl"
    rows = _long_text_rows(tokenizer, 200, 1024, 2040)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = prepare_data(DataConfig(source=str(path), eval_split=None, responses_only=False), tokenizer, 2048)
    whole, whole_stats = pack_dataset(data.train, batch_size=batch_size, max_seq_length=2048)
    packed, stats = pack_dataset(data.train, batch_size=batch_size, max_seq_length=2048, strategy="split")
    capacity = batch_size * 2048
    assert [len(x) for x in packed["input_ids"][:-1]] == [capacity] * (packed.num_rows - 1)
    assert sum(packed["input_ids"], []) == sum(data.train["input_ids"], [])
    assert sum(packed["labels"], []) == sum(data.train["labels"], [])
    assert all(0 < n <= 2048 for lengths in packed["seq_lengths"] for n in lengths)
    assert stats.strategy == "split" and stats.documents == 200 and stats.tokens == whole_stats.tokens
    assert stats.split_documents == sum(len(x) for x in packed["seq_lengths"]) - 200 > 0
    assert stats.as_dict()["split_documents"] == stats.split_documents
    print(f"long text rows, batch {batch_size}: whole {whole_stats.line()}; split {stats.line()}")
    assert stats.fill >= 0.99 and whole_stats.fill < 0.95
    assert "documents cut across micro-batches" in stats.line() and "(whole documents)" in whole_stats.line()
