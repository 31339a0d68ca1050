"""``data.packing``: documents packed into micro-batches of ``batch_size x max_seq_length`` tokens,
trained padding-free. ``true`` / ``"whole"``: whole documents, best-fit-decreasing. ``"split"``:
documents end to end, cut where a micro-batch is full (see :func:`split_end_to_end`).

Each packed entry is one micro-batch: its documents laid end to end in one row, with their lengths
(``seq_lengths``). The trainer's collator (:func:`packed_collator`, TRL's padding-free one) turns
those into ``position_ids`` that restart at every document and ``cu_seq_lens``, so attention never
crosses a document boundary (nbtune's patched attention and transformers' own both cut the row
there), and the first token of each document is never a target of the one before it.

Why micro-batches and not rows of ``max_seq_length``: padding-free, a micro-batch of ``batch_size``
rows is one flat row anyway, so its token budget is what matters. ``whole`` never splits a document: with
documents of 1,024-2,048 tokens and rows of 2,048, rows could hold only one document each (~75%
full); a budget of ``batch_size x 2048`` tokens takes two, three or more whole documents together.
Memory is that of ``batch_size`` rows of ``max_seq_length`` (the planner's figure): the tokens are
at most as many, and attention runs per document, each at most ``max_seq_length`` long.

Documents longer than ``max_seq_length`` are truncated to their first ``max_seq_length`` tokens
when tokenized (as without packing, so both train on the same tokens); their number is the run's
``rows_truncated``. Labels (``-100`` outside the assistant turns with ``responses_only``) travel
with their tokens. The fill, real tokens / (micro-batches x batch_size x max_seq_length), is
reported in the run's summary.

``"split"`` fills every micro-batch but the last. Documents keep their order; the one that crosses a
micro-batch's end is cut there, and its rest opens the next micro-batch as a sequence of its own:
positions restart at 0 and it attends only to itself, so the rest loses the context of its first
part, and its first token (the cut's) is no target, like every sequence's first token. Use it where
documents are long against ``max_seq_length`` (1,024-2,048-token documents fill a 2,048-token row to
~75% whole, since no two fit); the run counts the cut documents (``split_documents``).
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
    strategy: str = "whole"  # "whole" | "split"
    split_documents: int = 0  # documents cut across micro-batches ("split")

    @property
    def capacity(self) -> int:
        """Tokens one micro-batch may hold: batch_size x max_seq_length."""
        return self.batch_size * self.max_seq_length

    @property
    def fill(self) -> float:
        """Real tokens / (micro-batches x batch_size x max_seq_length)."""
        return self.tokens / (self.micro_batches * self.capacity) if self.micro_batches else 0.0

    def line(self) -> str:
        return packing_line(self.as_dict())

    def as_dict(self) -> dict:
        return dict(documents=self.documents, micro_batches=self.micro_batches, tokens=self.tokens,
                    batch_size=self.batch_size, max_seq_length=self.max_seq_length, fill=round(self.fill, 4),
                    strategy=self.strategy, split_documents=self.split_documents)


def packing_line(stats: dict) -> str:
    """The run summary's packing line, from :meth:`PackingStats.as_dict` (also as a run stores it):
    fill is real tokens over micro-batches x batch_size x max_seq_length."""
    cut = (f" ({stats.get('split_documents', 0):,} documents cut across micro-batches)"
           if stats.get("strategy") == "split" else " (whole documents)")
    return (f"packing: {stats['documents']:,} documents in {stats['micro_batches']:,} micro-batches of "
            f"{stats['batch_size']} x {stats['max_seq_length']} tokens, {stats['fill']:.1%} full{cut}")


def packing_strategy(packing) -> str | None:
    """``data.packing`` -> "whole", "split", or None (no packing)."""
    if packing is True or packing == "whole":
        return "whole"
    if packing == "split":
        return "split"
    return None


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


def split_end_to_end(lengths, capacity: int) -> list[list[tuple[int, int, int]]]:
    """Micro-batches of ``(item, start, end)`` pieces: the items laid end to end in their order and cut
    every ``capacity`` tokens, so each micro-batch but the last holds exactly ``capacity``; an item
    that crosses a cut goes on in the next micro-batch."""
    if capacity < 1:
        raise ValueError(f"micro-batches of {capacity} tokens cannot hold a document")
    bins: list[list[tuple[int, int, int]]] = [[]]
    room = capacity
    for i, n in enumerate(lengths):
        start = 0
        while start < n:
            if room == 0:
                bins.append([])
                room = capacity
            take = min(room, n - start)
            bins[-1].append((i, start, start + take))
            start += take
            room -= take
    return [b for b in bins if b]


def pack_dataset(dataset, batch_size: int, max_seq_length: int, strategy: str = "whole"):
    """(packed datasets.Dataset with input_ids, labels, seq_lengths; :class:`PackingStats`) from a
    tokenized one (input_ids, labels), every row already at most ``max_seq_length`` tokens;
    ``strategy``: "whole" (:func:`best_fit_decreasing`) or "split" (:func:`split_end_to_end`)."""
    import datasets

    if strategy not in ("whole", "split"):
        raise ValueError(f"packing strategy {strategy!r}: expected 'whole' or 'split'")
    ids, labels = dataset["input_ids"], dataset["labels"]
    lengths = [len(x) for x in ids]
    too_long = [n for n in lengths if n > max_seq_length]
    if too_long:
        raise ValueError(f"packing: {len(too_long)} rows are longer than max_seq_length={max_seq_length} "
                         f"(longest {max(too_long)}); rows must be truncated before packing")
    capacity = batch_size * max_seq_length
    if strategy == "whole":
        bins = [[(i, 0, lengths[i]) for i in b] for b in best_fit_decreasing(lengths, capacity)]
    else:
        bins = split_end_to_end(lengths, capacity)
    out_ids, out_labels, out_lengths = [], [], []
    for b in bins:
        out_ids.append([t for i, s, e in b for t in ids[i][s:e]])
        out_labels.append([t for i, s, e in b for t in labels[i][s:e]])
        out_lengths.append([e - s for _, s, e in b])
    packed = datasets.Dataset.from_dict({"input_ids": out_ids, "labels": out_labels, "seq_lengths": out_lengths})
    pieces = sum(len(b) for b in bins)
    stats = PackingStats(documents=len(lengths), micro_batches=len(bins), tokens=sum(lengths),
                         batch_size=batch_size, max_seq_length=max_seq_length, strategy=strategy,
                         split_documents=pieces - sum(1 for n in lengths if n > 0))
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
