"""Python's cyclic garbage collector during training: count its pauses, and (opt-in) keep full collections short.

A full (generation 2) collection walks every container object the interpreter tracks. With torch,
transformers, peft, TRL and datasets imported that is ~0.5 million objects: 240 ms per collection on
the CI-class CPU, before any model is loaded. The autograd contexts and saved-tensor wrappers of a
micro-batch live from its forward to its backward, long enough to be promoted, so the collector's
own thresholds could start full collections during training. A step that took one would be longer
by its length, and under data parallelism each rank's pause would hold up the other ranks at the
next all-reduce.

Measured, it did not happen in nbtune's runs (benchmarks/NOTES.md, session 8): no full collection in
the timed steps of four llama3-8b 8x2x2048 runs on an H200 (13-17 ms of young-generation collections
per ~3 s step), nor in 80 steps of the embedded 135M model on a CPU. So:

- :class:`CollectorPauses` times every collection (``gc.callbacks``) and gives, for the metrics
  records, the pause time since the previous record (``gc_ms``) and the number of full collections
  among them (``gc_full``): a slow step can be checked against the collector at once;
- with ``NBTUNE_GC_FREEZE=1`` it also freezes the heap at the start of training (``gc.collect()``,
  then ``gc.freeze()``: every object alive then moves to the permanent generation the collector
  never walks), so later full collections walk only what training created, and unfreezes it at the
  end. Cyclic garbage made during training is still collected; reference counting, which frees the
  tensors, is not affected. Off by default: five alternating rounds on two H200 hosts gave 1.10x and
  0.95x (medians), i.e. no effect beyond the hosts' noise.
"""
from __future__ import annotations

import gc
import time

from transformers import TrainerCallback

from nbtune._env import env_flag

FREEZE_ENV = "NBTUNE_GC_FREEZE"


def freeze_wanted() -> bool:
    """True when NBTUNE_GC_FREEZE says 1/true/yes/on; False otherwise (the default)."""
    return env_flag(FREEZE_ENV, default=False)


class CollectorPauses(TrainerCallback):
    """Time the collector's pauses during the training loop; freeze its heap there when asked (see the module)."""

    def __init__(self, freeze: bool | None = None):
        self.freeze = freeze_wanted() if freeze is None else freeze
        self.frozen = 0  # objects moved to the permanent generation at the start (0: not frozen)
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
        if self.freeze:
            gc.collect()
            gc.freeze()
            self.frozen = gc.get_freeze_count()
        self._since = [0.0, 0]

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Unfreeze (when this callback froze) and stop timing; safe to call twice."""
        if self.frozen:
            gc.unfreeze()
            self.frozen = 0
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    # -- for the metrics stream
    def record_fields(self) -> dict:
        """``gc_ms`` (pause time) and ``gc_full`` (full collections) since the previous call."""
        ms, full = self._since
        self._since = [0.0, 0]
        return dict(gc_ms=round(ms * 1e3, 1), gc_full=full)
