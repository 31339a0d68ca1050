"""The stream of training metrics: one dict per logging step, to a JSONL file and to listeners.

A record holds: step, max_steps, loss, eval_loss (on evaluation steps), lr, grad_norm, tokens
seen, tokens/s since the last record, VRAM allocated / reserved / peak (GiB, CUDA only), elapsed
seconds and ETA. Listeners (the dashboard, the terminal progress line) receive each record as
it is written.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback


def gpu_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    gib = 2**30
    return dict(
        vram_alloc_gib=round(torch.cuda.memory_allocated() / gib, 3),
        vram_reserved_gib=round(torch.cuda.memory_reserved() / gib, 3),
        vram_peak_gib=round(torch.cuda.max_memory_reserved() / gib, 3),
    )


class MetricsStream(TrainerCallback):
    """transformers callback writing one JSON record per log event and fanning it out to listeners."""

    def __init__(self, path: str | Path, listeners: list[Callable[[dict], None]] | None = None, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text("")
        self.listeners = list(listeners or [])
        self.records: list[dict] = []
        self._t0 = None
        self._last = None  # (time, tokens) at the previous record

    def on_train_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._t0 = now
        self._last = (now, int(getattr(state, "num_input_tokens_seen", 0) or 0))
        self.emit(dict(event="start", step=state.global_step, max_steps=state.max_steps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = time.perf_counter()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        rec = dict(event="eval" if any(k.startswith("eval_") for k in logs) else "train",
                   step=state.global_step, max_steps=state.max_steps)
        for src, dst in (("loss", "loss"), ("eval_loss", "eval_loss"), ("learning_rate", "lr"),
                         ("grad_norm", "grad_norm"), ("train_loss", "train_loss"), ("epoch", "epoch")):
            if src in logs and logs[src] is not None:
                rec[dst] = float(logs[src])
        if rec["event"] == "train" and self._last is not None:
            dt = now - self._last[0]
            if dt > 0 and tokens > self._last[1]:
                rec["tokens_per_s"] = round((tokens - self._last[1]) / dt, 1)
            self._last = (now, tokens)
        rec["tokens"] = tokens
        rec.update(gpu_memory())
        if self._t0 is not None:
            elapsed = now - self._t0
            rec["elapsed_s"] = round(elapsed, 2)
            if state.global_step and state.max_steps:
                rec["eta_s"] = round(elapsed / state.global_step * (state.max_steps - state.global_step), 1)
        self.emit(rec)

    def on_train_end(self, args, state, control, **kwargs):
        self.emit(dict(event="end", step=state.global_step, max_steps=state.max_steps, **gpu_memory()))

    def emit(self, rec: dict) -> None:
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        rec["time"] = round(time.time(), 3)
        self.records.append(rec)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        for listener in self.listeners:
            listener(rec)


def read_log(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
