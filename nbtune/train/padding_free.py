"""Padding-free (packed) batches collated with numpy: TRL's batch, a fraction of its host time.

With ``data.packing`` TRL's ``DataCollatorForLanguageModeling(padding_free=True)`` flattens the
rows of a batch into one sequence: input ids, labels with each sequence's first token ignored
(-100), position ids restarting at each sequence, the sequences' cumulative lengths and index per
token. It converts every row's Python lists with ``torch.tensor`` (~0.3 µs per token) and builds
the positions in a Python loop: 5-30 ms per batch of 2 x 2048 tokens, on the host, between two
optimizer steps. :class:`PaddingFreeCollator` builds the same tensors from the same lists with
numpy (tens of µs per row). Its first batch is also collated by TRL and compared: when anything
differs (a TRL version with other rules, rows it does not expect) it hands every batch to TRL.
Rows it does not handle (not lists of integers, empty, sequence lengths that do not add up to
the row) go to TRL as well.

TRL adds the sequences' bounds (``cu_seq_lens_q/k``, ``max_length_q/k``, ``seq_idx``) from 1.16 on;
1.15 (the floor of pyproject.toml) stops at the position ids. :func:`with_sequence_bounds` adds
them to such a batch from its position ids, by TRL 1.16's rule, so the model and nbtune's attention
plan get the same batch on either.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def _ints(values) -> np.ndarray | None:
    """A list of Python ints as an int64 array (what ``torch.tensor`` makes of it), else None."""
    if type(values) is not list or not values:
        return None
    arr = np.array(values)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        return None
    return arr.astype(np.int64, copy=False)


def padding_free_batch(examples) -> dict | None:
    """TRL's padding-free batch of these rows (its ``torch_call`` with ``pad_to_multiple_of``
    None), or None for rows this does not handle."""
    if not examples or not all(isinstance(e, Mapping) and "input_ids" in e for e in examples):
        return None
    packed = "seq_lengths" in examples[0]  # TRL's test, on the first row only
    ids, labels, lengths = [], [], []
    for e in examples:
        row = _ints(e["input_ids"])
        lab = _ints(e["labels"]) if "labels" in e else row
        if row is None or lab is None or len(lab) != len(row):
            return None
        if packed:
            if "seq_lengths" not in e:
                return None
            lens = _ints(e["seq_lengths"])
            if lens is None or (lens < 1).any() or int(lens.sum()) != len(row):
                return None
            lengths.append(lens)
        else:
            lengths.append(np.array([len(row)], dtype=np.int64))
        ids.append(row)
        labels.append(lab)
    ids = np.concatenate(ids)
    labels = np.concatenate(labels)  # a new array: the rows' own are not changed
    lengths = np.concatenate(lengths)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    positions = np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lengths)
    labels[starts] = -100  # TRL: labels[position_ids == 0] = -100
    cu_seq_lens = torch.from_numpy(np.concatenate([[0], ends]).astype(np.int32))
    max_length = int(lengths.max())
    return {
        "input_ids": torch.from_numpy(ids)[None],
        "labels": torch.from_numpy(labels)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
        "seq_idx": torch.from_numpy(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths))[None],
    }


BOUNDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def with_sequence_bounds(batch):
    """A padding-free batch (one row of position ids, no attention mask) with the sequences'
    bounds that TRL 1.16 adds, taken from its position ids as TRL does (a sequence starts at each
    position 0); the batch itself when it has them or is not padding-free."""
    if not isinstance(batch, Mapping) or "cu_seq_lens_q" in batch or "attention_mask" in batch:
        return batch
    positions = batch.get("position_ids")
    if not torch.is_tensor(positions) or positions.dim() != 2 or positions.shape[0] != 1 or positions.numel() == 0:
        return batch
    starts = (positions[0] == 0).nonzero().flatten()
    cu_seq_lens = torch.cat([starts, torch.tensor([positions.shape[1]])]).to(torch.int32)
    lengths = cu_seq_lens.diff()
    max_length = int(lengths.max())
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths)[None]
    return dict(batch, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=max_length,
                max_length_k=max_length, seq_idx=seq_idx)


def same_batch(a, b) -> bool:
    """The same keys in the same order, tensors equal in dtype, shape and values, other values equal."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping) or list(a) != list(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x, y)):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


class PaddingFreeCollator:
    """TRL's padding-free collator with its batches built by :func:`padding_free_batch`; the first
    batch is checked against TRL's own, TRL's batches get the sequences' bounds where TRL leaves
    them out (see the module docstring)."""

    def __init__(self, collator):
        self.collator = collator
        self.exact: bool | None = None  # None until the first batch was compared

    def __call__(self, examples):
        batch = padding_free_batch(examples) if self.exact is not False else None
        if batch is None:
            return with_sequence_bounds(self.collator(examples))
        if self.exact is None:
            reference = with_sequence_bounds(self.collator(examples))
            self.exact = same_batch(batch, reference)
            return reference
        return batch

    def __getattr__(self, name):  # the wrapped collator's own attributes (TRL reads some)
        if name in ("collator", "exact"):
            raise AttributeError(name)
        return getattr(self.collator, name)


def fast_padding_free(collator):
    """``collator`` wrapped in a :class:`PaddingFreeCollator` when it is TRL's padding-free
    language-modeling collator with settings the numpy path builds (no ``pad_to_multiple_of``,
    torch tensors); else ``collator`` itself."""
    try:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    except ImportError:  # pragma: no cover - a TRL without this collator
        return collator
    if (type(collator) is DataCollatorForLanguageModeling and getattr(collator, "padding_free", False)
            and getattr(collator, "pad_to_multiple_of", None) is None
            and getattr(collator, "return_tensors", "pt") == "pt"):
        return PaddingFreeCollator(collator)
    return collator
