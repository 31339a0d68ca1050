"""``data.packing``: whole documents packed best-fit-decreasing into micro-batches of
``batch_size x max_seq_length`` tokens, trained padding-free.

Each packed entry is one micro-batch: its documents laid end to end in one row, with their lengths
(``seq_lengths``). The trainer's collator (:func:`packed_collator`, TRL's padding-free one) turns
those into ``position_ids`` that restart at every document and ``cu_seq_lens``, so attention never
crosses a document boundary (nbtune's patched attention and transformers' own both cut the row
there), and the first token of each document is never a target of the one before it.

Why micro-batches and not rows of ``max_seq_length``: padding-free, a micro-batch of ``batch_size``
rows is one flat row anyway, so its token budget is what matters. A document is never split: with
documents of 1,024-2,048 tokens and rows of 2,048, rows could hold only one document each (~75%
full); a budget of ``batch_size x 2048`` tokens takes two, three or more whole documents together.
Memory is that of ``batch_size`` rows of ``max_seq_length`` (the planner's figure): the tokens are
at most as many, and attention runs per document, each at most ``max_seq_length`` long.

Documents longer than ``max_seq_length`` are truncated to their first ``max_seq_length`` tokens
when tokenized (as without packing, so both train on the same tokens); their number is the run's
``rows_truncated``. Labels (``-100`` outside the assistant turns with ``responses_only``) travel
with their tokens. The fill, real tokens / (micro-batches x batch_size x max_seq_length), is
reported in the run's summary.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections import deque


@dataclasses.dataclass(frozen=True)
class PackingStats:
    """What packing made of the train rows."""

    documents: int
    micro_batches: int
    tokens: int  # real tokens, all documents
    batch_size: int
    max_seq_length: int

    @property
    def capacity(self) -> int:
        """Tokens one micro-batch may hold: batch_size x max_seq_length."""
        return self.batch_size * self.max_seq_length

    @property
    def fill(self) -> float:
        """Real tokens / (micro-batches x batch_size x max_seq_length)."""
        return self.tokens / (self.micro_batches * self.capacity) if self.micro_batches else 0.0

    def line(self) -> str:
        return (f"packing: {self.documents:,} documents in {self.micro_batches:,} micro-batches of "
                f"{self.batch_size} x {self.max_seq_length} tokens, {self.fill:.1%} full")

    def as_dict(self) -> dict:
        return dict(documents=self.documents, micro_batches=self.micro_batches, tokens=self.tokens,
                    batch_size=self.batch_size, max_seq_length=self.max_seq_length, fill=round(self.fill, 4))


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most ``capacity``: items taken longest
    first, each into the open bin with the least room that still fits it (a new bin when none does).

    The open bins are kept by their room: a sorted list of the distinct rooms (at most ``capacity``
    of them) and a queue of bins per room, so each item costs one bisection."""
    rooms: list[int] = []  # distinct free rooms of open bins, ascending
    bins_with: dict[int, deque] = {}  # room -> bins (indices into ``bins``) with exactly that room
    bins: list[list[int]] = []
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    for i in order:
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"a document of {n} tokens cannot go into micro-batches of {capacity} tokens")
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            b = bins_with[room].popleft()
            if not bins_with[room]:
                del bins_with[room]
                rooms.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - n
        if left > 0:
            if left not in bins_with:
                bins_with[left] = deque()
                bisect.insort(rooms, left)
            bins_with[left].append(b)
    return bins


def pack_dataset(dataset, batch_size: int, max_seq_length: int):
    """(packed datasets.Dataset with input_ids, labels, seq_lengths; :class:`PackingStats`) from a
    tokenized one (input_ids, labels), every row already at most ``max_seq_length`` tokens."""
    import datasets

    ids, labels = dataset["input_ids"], dataset["labels"]
    lengths = [len(x) for x in ids]
    too_long = [n for n in lengths if n > max_seq_length]
    if too_long:
        raise ValueError(f"packing: {len(too_long)} rows are longer than max_seq_length={max_seq_length} "
                         f"(longest {max(too_long)}); rows must be truncated before packing")
    bins = best_fit_decreasing(lengths, batch_size * max_seq_length)
    out_ids, out_labels, out_lengths = [], [], []
    for b in bins:
        out_ids.append([t for i in b for t in ids[i]])
        out_labels.append([t for i in b for t in labels[i]])
        out_lengths.append([lengths[i] for i in b])
    packed = datasets.Dataset.from_dict({"input_ids": out_ids, "labels": out_labels, "seq_lengths": out_lengths})
    stats = PackingStats(documents=len(lengths), micro_batches=len(bins), tokens=sum(lengths),
                         batch_size=batch_size, max_seq_length=max_seq_length)
    return packed, stats


def packed_collator(pad_token_id: int):
    """The collator of a packed run (:class:`PackedCollator`)."""
    return PackedCollator(pad_token_id)


class PackedCollator:
    """Packed train entries -> TRL's padding-free collation: one row, ``position_ids`` restarting at
    each document (from ``seq_lengths``), ``cu_seq_lens_q/k``, no attention mask, the label of each
    document's first token set to -100. Plain rows (the held-out set, never packed) -> TRL's padded
    collation, as in a run without packing, so the held-out loss is the same number either way."""

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.packed = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
        self.padded = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, features):
        if "seq_lengths" in features[0]:
            from .padding_free import with_sequence_bounds

            return with_sequence_bounds(self.packed(features))  # the bounds also from a TRL that leaves them out
        return self.padded(features)
