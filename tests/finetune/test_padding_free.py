"""Packed (padding-free) batches collated with numpy (nbtune/train/padding_free.py): TRL's batch,
tensor for tensor, with the sequences' bounds TRL adds from 1.16 on; rows it does not handle, and a
TRL whose batch differs, go to TRL."""
import random

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import nbtune
from nbtune.train import trainer as trainer_module
from nbtune.train.padding_free import (BOUNDS, PaddingFreeCollator, fast_padding_free, padding_free_batch, same_batch,
                                       with_sequence_bounds)

from .conftest import tiny_config


def rows(n_rows, packed=True, labels=True, seed=0, lo=1, hi=300):
    rng = random.Random(seed)
    out = []
    for _ in range(n_rows):
        lens = [rng.randint(lo, hi) for _ in range(rng.randint(1, 5) if packed else 1)]
        ids = [rng.randrange(50_000) for _ in range(sum(lens))]
        row = {"input_ids": ids}
        if labels:
            row["labels"] = [i if rng.random() < 0.7 else -100 for i in ids]
        if packed:
            row["seq_lengths"] = lens
        out.append(row)
    return out


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
@pytest.mark.parametrize("n_rows", [1, 2, 5])
def test_the_batch_is_trls(packed, labels, n_rows):
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    for seed in range(3):
        examples = rows(n_rows, packed, labels, seed, lo=1 if seed == 0 else 50)
        kept = [dict(e, **{k: list(v) for k, v in e.items()}) for e in examples]
        ours, theirs = padding_free_batch(examples), with_sequence_bounds(trl(examples))
        assert ours is not None and same_batch(ours, theirs), (ours, theirs)
        assert ours["cu_seq_lens_q"] is ours["cu_seq_lens_k"]
        assert examples == kept  # the rows are left as they were


def test_the_bounds_are_trls():
    """The bounds made from the position ids are TRL's own where TRL adds them (1.16 on), and what
    the sequences' lengths say: cumulative lengths, the longest, each token's sequence index."""
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    for seed in range(3):
        examples = rows(3, seed=seed)
        batch = with_sequence_bounds(trl(examples))
        without = {k: v for k, v in batch.items() if k not in BOUNDS}
        assert list(without) == ["input_ids", "labels", "position_ids"]
        assert same_batch(with_sequence_bounds(without), batch)
        lengths = [n for e in examples for n in e["seq_lengths"]]
        assert batch["cu_seq_lens_q"].tolist() == torch.tensor([0, *lengths]).cumsum(0).tolist()
        assert batch["cu_seq_lens_q"] is batch["cu_seq_lens_k"] and batch["cu_seq_lens_q"].dtype == torch.int32
        assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
        assert batch["seq_idx"].tolist() == [[i for i, n in enumerate(lengths) for _ in range(n)]]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows(2, packed=False))
    assert with_sequence_bounds(padded) is padded  # a padded batch (attention mask) has no bounds to add


def test_same_batch_tells_every_difference():
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = with_sequence_bounds(trl(rows(2)))
    assert same_batch(batch, with_sequence_bounds(trl(rows(2))))
    changed = [dict(batch, labels=batch["labels"].clone()), dict(batch, seq_idx=batch["seq_idx"].long()),
               dict(batch, max_length_q=batch["max_length_q"] + 1), {k: batch[k] for k in reversed(batch)},
               {k: v for k, v in batch.items() if k != "seq_idx"}]
    changed[0]["labels"][0, 1] = 7
    assert not any(same_batch(c, batch) for c in changed)


@pytest.mark.parametrize("bad", ["tensor", "empty", "floats", "lengths", "zero-length", "no-lengths-later"])
def test_rows_it_does_not_handle_go_to_trl(bad):
    examples = rows(2, seed=1)
    if bad == "tensor":
        examples[0]["input_ids"] = torch.tensor(examples[0]["input_ids"])
    elif bad == "empty":
        examples = [{"input_ids": [], "labels": []}]
    elif bad == "floats":
        examples[1]["labels"] = [float(x) for x in examples[1]["labels"]]
    elif bad == "lengths":
        examples[1]["seq_lengths"] = examples[1]["seq_lengths"] + [3]
    elif bad == "zero-length":
        examples[1]["seq_lengths"] = examples[1]["seq_lengths"] + [0]
    else:
        del examples[1]["seq_lengths"]
    assert padding_free_batch(examples) is None
    calls = []
    collator = PaddingFreeCollator(lambda ex: calls.append(ex) or {"from": "trl"})
    assert collator(examples) == {"from": "trl"} and calls == [examples]


def test_the_first_batch_is_checked_against_trl():
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    calls = []

    def counted(examples):
        calls.append(1)
        return trl(examples)

    def trl_batch(examples):  # TRL's batch, with the bounds where this TRL leaves them out
        return with_sequence_bounds(trl(examples))

    collator = PaddingFreeCollator(counted)
    first = collator(rows(2, seed=1))
    assert collator.exact is True and len(calls) == 1 and same_batch(first, trl_batch(rows(2, seed=1)))
    assert same_batch(collator(rows(3, seed=2)), trl_batch(rows(3, seed=2))) and len(calls) == 1  # numpy from then on

    def other_rules(examples):  # a TRL whose batch is not what the numpy path builds
        batch = trl_batch(examples)
        batch["labels"][0, -1] = 99_999
        return batch

    odd = PaddingFreeCollator(other_rules)
    assert same_batch(odd(rows(2, seed=1)), other_rules(rows(2, seed=1))) and odd.exact is False
    assert same_batch(odd(rows(2, seed=2)), other_rules(rows(2, seed=2)))  # TRL's batches from then on


def test_only_trls_padding_free_collator_is_wrapped():
    assert isinstance(fast_padding_free(DataCollatorForLanguageModeling(0, padding_free=True)), PaddingFreeCollator)
    wrapped = fast_padding_free(DataCollatorForLanguageModeling(0, padding_free=True))
    assert wrapped.padding_free is True and wrapped.pad_token_id == 0  # its attributes, as TRL reads them
    for kept in (DataCollatorForLanguageModeling(0), DataCollatorForLanguageModeling(0, padding_free=True,
                                                                                       pad_to_multiple_of=8)):
        assert fast_padding_free(kept) is kept


def _packed_run(tiny_model_dir, tiny_data, out, monkeypatch, numpy_path: bool):
    seen = []
    if numpy_path:
        monkeypatch.setattr(trainer_module, "fast_padding_free", lambda c: seen.append(fast_padding_free(c)) or seen[-1])
    else:
        monkeypatch.setattr(trainer_module, "fast_padding_free", lambda c: c)
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=3, batch_size=2, grad_accum=1)
    cfg["data"].update(packing=True, responses_only=False, eval_split=None)
    result = nbtune.finetune(cfg, dashboard=False, progress=False)
    monkeypatch.undo()
    return [(r["step"], r["loss"], r["grad_norm"]) for r in result.metrics if r.get("event") == "train"
            and "loss" in r], seen


def test_a_packed_run_trains_as_with_trls_collator(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    ours, seen = _packed_run(tiny_model_dir, tiny_data, tmp_path / "numpy", monkeypatch, True)
    theirs, _ = _packed_run(tiny_model_dir, tiny_data, tmp_path / "trl", monkeypatch, False)
    assert len(seen) == 1 and isinstance(seen[0], PaddingFreeCollator) and seen[0].exact is True
    assert ours == theirs and len(ours) == 3
