"""Python's cyclic garbage collector during training: its pauses, counted.

A full (generation 2) collection walks every object the interpreter tracks (~0.5 million with
torch, transformers, peft, TRL and datasets imported: hundreds of ms). The autograd state of a
micro-batch lives long enough to be promoted, so full collections could start during training,
lengthen a step, and under data parallelism hold up the other ranks at the next all-reduce. In
the measured runs none did, and freezing the heap for training made no difference beyond
run-to-run noise (benchmarks/NOTES.md, "Measurement hygiene"). So :class:`CollectorPauses` only
times every collection (``gc.callbacks``) and gives, for the metrics records, the pause time since
the previous record (``gc_ms``) and the number of full collections among them (``gc_full``): a
slow step can be checked against the collector at once.
"""
from __future__ import annotations

import gc
import time

from transformers import TrainerCallback


class CollectorPauses(TrainerCallback):
    """Time the collector's pauses during the training loop (see the module)."""

    def __init__(self):
        self._started: float | None = None
        self._since = [0.0, 0]  # pause seconds and full collections since the last record
        self.total = [0.0, 0]  # the same over the whole training loop

    # -- the collector's callback
    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            seconds = time.perf_counter() - self._started
            full = int(info.get("generation", 0) == 2)
            for acc in (self._since, self.total):
                acc[0] += seconds
                acc[1] += full
            self._started = None

    # -- the trainer's events
    def on_train_begin(self, args, state, control, **kwargs):
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)
        self._since = [0.0, 0]

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Stop timing; safe to call twice."""
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    # -- for the metrics stream
    def record_fields(self) -> dict:
        """``gc_ms`` (pause time) and ``gc_full`` (full collections) since the previous call."""
        ms, full = self._since
        self._since = [0.0, 0]
        return dict(gc_ms=round(ms * 1e3, 1), gc_full=full)
