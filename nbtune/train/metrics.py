"""The stream of training metrics: one dict per logging step, to a JSONL file and to listeners.

A record holds: event, step, max_steps, loss, eval_loss (on evaluation steps), lr, grad_norm,
tokens seen, tokens/s since the last record, VRAM allocated / reserved / peak (GiB, CUDA only),
elapsed seconds and ETA, and what the ``fields`` providers add to train records (the garbage
collector's pauses since the previous record, ``gc_ms`` / ``gc_full``: gc_pause.py) and, in a
preference run (``train.method`` dpo / orpo), what TRL's trainer logs for it (:data:`PREFERENCE_KEYS`:
the chosen and rejected replies' rewards, the margin, the share of pairs ranked right, their
log-probabilities; ORPO's chosen-reply loss and log odds ratio) and, in a GRPO run, what its
trainer logs (:data:`GRPO_KEYS`: the mean reward, summed and per reward function as
``rewards/<name>``, its spread, the completions' mean length and share cut at
max_completion_length, the policy's entropy, the KL to the reference, and the sampling's cost:
``generation_s`` seconds and ``generation_tokens`` completion tokens per generation, their ratio
``generation_tokens_per_s``), ``eval_``-prefixed on evaluation records. Events:
``start`` (with the GPU's capacity ``vram_total_gib``, the number of processes ``world_size``,
the ``global_batch`` in rows per optimizer step, the ``gradient_checkpointing`` mode the run uses
with its ``checkpointing_reason``, the ``versions`` of nbtune, Python and the stack (torch,
transformers, peft, trl, bitsandbytes, triton; nbtune/versions.py) and, on a resumed run,
``resumed_from``), ``train``, ``eval``,
``summary`` (transformers' end-of-training totals), ``interrupted`` (a stop asked for by the user,
with the checkpoint it saved), ``end`` and, in a data-parallel run, ``distributed`` (whether the
ranks' LoRA weights agree at the end).
In a data-parallel run only rank 0 writes the file and has listeners; its losses and token
counts are gathered over all ranks by the Trainer, its VRAM figures are its own GPU's.
Listeners (the dashboard, the terminal progress line) receive each record as it is written; a
listener that raises is reported once and dropped, so a display problem never stops training.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from ..versions import stack_versions


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


def gpu_capacity() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return dict(gpu=props.name, vram_total_gib=round(props.total_memory / 2**30, 3))


# TRL's preference-training logs -> the record's keys (evaluation records: both with "eval_" in front)
PREFERENCE_KEYS = {
    "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected", "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy", "logps/chosen": "logp_chosen", "logps/rejected": "logp_rejected",
    "nll_loss": "nll_loss", "log_odds_ratio": "log_odds_ratio",
}


# TRL's GRPO logs -> the record's keys; "rewards/<name>/mean" (one per reward function) -> "rewards/<name>"
GRPO_KEYS = {
    "reward": "reward", "reward_std": "reward_std", "frac_reward_zero_std": "reward_zero_std_share",
    "completions/mean_length": "completion_length", "completions/clipped_ratio": "completion_clipped_share",
    "entropy": "entropy", "kl": "kl", "generation/seconds": "generation_s", "generation/tokens": "generation_tokens",
}


def _grpo_fields(logs: dict) -> dict:
    out = {}
    for prefix in ("", "eval_"):
        for src, dst in GRPO_KEYS.items():
            if logs.get(prefix + src) is not None:
                out[prefix + dst] = float(logs[prefix + src])
        for key, value in logs.items():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name and name.startswith("rewards/") and name.endswith("/mean") and value is not None:
                out[prefix + name[: -len("/mean")]] = float(value)
        seconds, tokens = out.get(prefix + "generation_s"), out.get(prefix + "generation_tokens")
        if seconds and tokens is not None:  # means over the record's generations: their tokens over their time
            out[prefix + "generation_tokens_per_s"] = round(tokens / seconds, 1)
    return out


class MetricsStream(TrainerCallback):
    """transformers callback writing one JSON record per log event and fanning it out to listeners."""

    def __init__(self, path: str | Path, listeners: list[Callable[[dict], None]] | None = None, append: bool = False,
                 write: bool = True):
        self.path = Path(path)
        self.write = write  # False on the ranks other than 0: records are kept in memory only
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                self.path.write_text("")
        self.listeners = list(listeners or [])
        self.records: list[dict] = []
        self._t0 = None
        self._step0 = 0  # the step this run started from (> 0 when resumed)
        self._last = None  # (time, tokens) at the previous record
        self.resumed_from: int | None = None
        self.start_fields: dict = {}  # the run's own facts for the start record (e.g. its checkpointing mode)
        self.fields: list[Callable[[], dict]] = []  # more fields for each train record (each called once per record)

    def on_train_begin(self, args, state, control, **kwargs):
        # on a resumed run transformers restores state.global_step after this event; the run
        # says where it resumes from through ``resumed_from``
        now = time.perf_counter()
        self._t0 = now
        self._step0 = self.resumed_from or 0
        self._last = None  # set at the first step, once a resumed run's state is restored
        rec = dict(event="start", step=self._step0, max_steps=state.max_steps, **gpu_capacity(),
                   world_size=args.world_size,
                   global_batch=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
                   versions=stack_versions())
        if self.resumed_from:
            rec["resumed_from"] = self.resumed_from
        rec.update(self.start_fields)
        self.emit(rec)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = (time.perf_counter(), int(getattr(state, "num_input_tokens_seen", 0) or 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = time.perf_counter()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        event = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        if event == "train" and "loss" not in logs and ("train_loss" in logs or "train_runtime" in logs):
            event = "summary"  # transformers' end-of-training totals
        rec = dict(event=event, step=state.global_step, max_steps=state.max_steps)
        for src, dst in (("loss", "loss"), ("eval_loss", "eval_loss"), ("learning_rate", "lr"),
                         ("grad_norm", "grad_norm"), ("train_loss", "train_loss"), ("epoch", "epoch")):
            if src in logs and logs[src] is not None:
                rec[dst] = float(logs[src])
        for src, dst in PREFERENCE_KEYS.items():
            for prefix in ("", "eval_"):
                if logs.get(prefix + src) is not None:
                    rec[prefix + dst] = float(logs[prefix + src])
        rec.update(_grpo_fields(logs))
        if rec["event"] == "train" and self._last is not None:
            dt = now - self._last[0]
            if dt > 0 and tokens > self._last[1]:
                rec["tokens_per_s"] = round((tokens - self._last[1]) / dt, 1)
            self._last = (now, tokens)
            for provider in self.fields:
                rec.update(provider())
        rec["tokens"] = tokens
        rec.update(gpu_memory())
        if self._t0 is not None:
            elapsed = now - self._t0
            rec["elapsed_s"] = round(elapsed, 2)
            done = state.global_step - self._step0
            if done > 0 and state.max_steps:
                rec["eta_s"] = round(elapsed / done * max(0, state.max_steps - state.global_step), 1)
        self.emit(rec)

    def on_train_end(self, args, state, control, **kwargs):
        self.emit(dict(event="end", step=state.global_step, max_steps=state.max_steps, **gpu_memory()))

    def history(self) -> list[dict]:
        """Every record of the run: the file where this process writes one (a resumed run appends to
        it, so it holds the steps before the resume too), else the records this process emitted."""
        return read_log(self.path) if self.write else list(self.records)

    def emit(self, rec: dict) -> None:
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        rec["time"] = round(time.time(), 3)
        self.records.append(rec)
        if not self.write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        for listener in list(self.listeners):
            try:
                listener(rec)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a display problem must not stop training
                print(f"nbtune: metrics listener {listener!r} failed and is turned off: {e!r}", file=sys.stderr)
                self.listeners.remove(listener)


def read_log(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_train_loss(records: list[dict]) -> float | None:
    """Mean loss per optimizer step over a log (each record's loss covers the steps since the
    previous one), so a resumed run's mean counts its steps before the interrupt too."""
    total = steps = 0.0
    prev = 0
    for r in records:
        if r.get("event") == "train" and r.get("loss") is not None and r["step"] > prev:
            total += r["loss"] * (r["step"] - prev)
            steps += r["step"] - prev
            prev = r["step"]
    return total / steps if steps else None


def truncate_log(path: str | Path, step: int) -> list[dict]:
    """Keep the records up to ``step`` (a resume point) and drop the rest, so that a resumed run's
    log reads like one uninterrupted run; returns the records kept."""
    path = Path(path)
    if not path.is_file():
        return []
    kept = [r for r in read_log(path) if r.get("step", 0) <= step and r.get("event") != "end"]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept
