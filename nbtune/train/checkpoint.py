"""Stop and resume: Ctrl-C (or the notebook's interrupt) stops after the current step and saves a
checkpoint that ``resume=True`` continues from.

Interrupting: while ``trainer.train()`` runs, a SIGINT handler (main thread only; the previous
handler comes back afterwards) records the request; :class:`InterruptCallback` then asks the
Trainer to save and stop at the end of the current optimizer step, so the checkpoint holds a
consistent state. A second interrupt aborts at once (a plain ``KeyboardInterrupt``). Where no
handler can be installed (not the main thread), a ``KeyboardInterrupt`` that escapes the step is
caught by the run, which saves what the last completed step left (everything but the RNG state is
then exact).

Checkpoints: ``<output.dir>/checkpoints/checkpoint-<step>/`` with what transformers' Trainer saves
(the adapter, optimizer, scheduler, grad scaler, RNG states and ``trainer_state.json``). Each is
written under a temporary name and renamed into place once complete, with a ``nbtune.json``
marker inside, so a half-written checkpoint (a crash, a dead kernel) is never resumed from.
The marker holds a manifest (size and SHA-256 of every file) and whether the LoRA weights were
finite; a resume checks both and falls back to the newest checkpoint that passes, saying so.
A crash during a save (disk full, killed kernel) leaves at most a staging folder, which the next
save (or the next run) removes; the complete checkpoints before it stay as they were.

When checkpoints are written: every ``train.save_minutes`` (default 10) and at the end of the
run (:class:`AutoSave`), every ``train.save_steps`` if set, and at an interrupt.

What is pickled: a checkpoint's weights (the adapter) are safetensors; the optimizer, scheduler,
grad-scaler and RNG states are torch files (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
``rng_state.pth``), written by transformers' Trainer, which reads them back on resume with
``torch.load(..., weights_only=True)``: tensors and plain containers only, never code.

Data parallel (torchrun / accelerate launch): every rank writes its own RNG state into the same
staging folder (``.staging-step<N>``), the ranks meet at a barrier before and after, and rank 0
alone marks, renames and prunes. An interrupt on any rank stops every rank at the same step: the
ranks agree on it (one tiny all-reduce) at each logging step, so with ``logging_steps > 1`` the
stop comes at the next logging step.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from . import distributed

MARKER = "nbtune.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def complete_checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints under ``<out>/checkpoints``, oldest step first."""
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def remove_own_checkpoints(out: Path) -> None:
    """Delete what nbtune's saves left in ``<out>/checkpoints``: its marked checkpoints and the
    staging folders of interrupted saves. Anything else there is the user's and stays."""
    root = checkpoints_dir(out)
    for p in complete_checkpoints(out):
        shutil.rmtree(p, ignore_errors=True)
    remove_stale_staging(out)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def remove_stale_staging(out: Path) -> None:
    """Staging folders of saves that a killed process never finished (the folder is locked by the
    run about to write, so no live save owns them)."""
    root = checkpoints_dir(out)
    for p in list(root.glob(".staging-*")) + list(root.glob(".replaced-checkpoint-*")):
        shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(folder: Path) -> dict[str, list]:
    """``{relative path: [bytes, sha256]}`` of every file in a checkpoint folder but its marker."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, _sha256(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (a short phrase), or None when it can."""
    path = Path(path)
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return f"its {MARKER} is missing or unreadable"
    if meta.get("finite") is False:
        return "its LoRA weights were not finite (NaN/inf) when it was saved"
    for rel, (size, digest) in (meta.get("files") or {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size:,} bytes where {size:,} were written (truncated or replaced)"
        if _sha256(f) != digest:
            return f"{rel} is not what was written (its SHA-256 differs: the file is damaged or was edited)"
    return None


def resumable_checkpoint(out: Path, say=print) -> Path | None:
    """The newest complete checkpoint under ``<out>/checkpoints`` that passes :func:`checkpoint_problem`;
    each newer one that fails is named with its problem."""
    for path in reversed(complete_checkpoints(out)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        say(f"nbtune: {path.name} cannot be resumed from: {problem}; trying the one before it")
    return None


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


class StagedCheckpoints:
    """Trainer mixin: every checkpoint is written to a staging folder, marked complete, then
    renamed to ``checkpoint-<step>``; old ones beyond ``keep`` are deleted."""

    nbtune_keep_checkpoints = 2
    nbtune_checkpoint_reason = "save_steps"

    def _save_checkpoint(self, model, trial):
        real = self.args.output_dir
        root = Path(real)
        parallel = self.args.world_size > 1
        main = self.args.process_index == 0
        # data parallel: one folder that every rank writes its RNG state into
        staging = root / (f".staging-step{self.state.global_step}" if parallel else f".staging-{os.getpid()}")
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()  # nobody writes into the staging folder before rank 0 has cleared it
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:  # a crash mid-save: drop the half-written copy, keep the last complete one
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self.args.output_dir = real
        distributed.barrier()  # every rank's files are in
        name = f"checkpoint-{self.state.global_step}"
        if not main:
            self.nbtune_last_checkpoint = root / name
            return
        interrupt = getattr(self, "nbtune_interrupt", None)
        reason = "interrupt" if interrupt is not None and interrupt.requested else self.nbtune_checkpoint_reason
        autosave = getattr(self, "nbtune_autosave", None)
        if autosave is not None and autosave.reason is not None and reason == self.nbtune_checkpoint_reason:
            reason = autosave.reason
        from .stability import weights_finite

        (staging / name / MARKER).write_text(json.dumps(dict(
            step=self.state.global_step, max_steps=self.state.max_steps, reason=reason,
            time=round(time.time(), 3), finite=weights_finite(model), files=manifest(staging / name))))
        final = root / name
        replaced = root / f".replaced-{name}-{os.getpid()}"
        if final.exists():  # a save of the same step again (an interrupt right after a scheduled save)
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)  # moved aside, not deleted, until the new copy is in place
        os.replace(staging / name, final)
        shutil.rmtree(replaced, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        for old in complete_checkpoints(root.parent)[: -self.nbtune_keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self.nbtune_last_checkpoint = final


class AutoSave(TrainerCallback):
    """Asks for a checkpoint every ``minutes`` of training and at the last step, so a disconnect
    loses at most ``minutes`` of work. Under data parallelism rank 0's clock decides, shared with
    the other ranks at logging steps (where they agree on interrupts too)."""

    def __init__(self, minutes: float | None, clock=time.monotonic):
        self.seconds = None if minutes is None else 60.0 * minutes
        self.clock = clock
        self.last = clock()
        self.reason: str | None = None

    def on_save(self, args, state, control, **kwargs):
        self.last, self.reason = self.clock(), None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        due = self.seconds is not None and self.clock() - self.last >= self.seconds
        if args.world_size > 1:
            if state.global_step % max(1, args.logging_steps):
                due = False
            else:
                due = distributed.any_rank(due and args.process_index == 0)
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            self.reason, control.should_save = "end", True
        elif due:
            self.reason, control.should_save = "autosave", True
        return control


class InterruptCallback(TrainerCallback):
    """Turns an interrupt request into "save a checkpoint and stop after this step"."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None

    def request(self) -> None:
        self.requested = True

    def _stop(self, state, control):
        if self.requested and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1:
            if state.global_step % max(1, args.logging_steps):
                return control  # ranks agree on a stop at logging steps only
            if distributed.any_rank(self.requested):  # every rank calls it at the same step
                self.requested = True
        return self._stop(state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # an interrupt that arrived while this step was being logged (e.g. from a listener); in a
        # data-parallel run the ranks settle it together at the next step's end instead
        if args.world_size > 1:
            return control
        if "loss" in (logs or {}) or "eval_loss" in (logs or {}):
            return self._stop(state, control)
        return control


class sigint_stops(object):
    """Context manager: while active, the first SIGINT calls ``callback.request()`` (stop after this
    step), the second raises ``KeyboardInterrupt``. A no-op outside the main thread."""

    def __init__(self, callback: InterruptCallback, message: str | None = None):
        self.callback = callback
        self.message = message
        self._previous = None
        self.installed = False

    def _handler(self, signum, frame):
        if self.callback.requested:
            raise KeyboardInterrupt
        self.callback.request()
        if self.message:
            print(self.message, file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self.installed = True
            except (ValueError, OSError):  # pragma: no cover - e.g. an embedded interpreter
                self.installed = False
        return self

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self.installed = False
        return False


def save_after_keyboard_interrupt(trainer) -> Path | None:
    """Best effort after a ``KeyboardInterrupt`` escaped mid-step: drop the partial gradients and
    save the state of the last completed optimizer step."""
    if trainer.state.global_step <= 0 or getattr(trainer, "optimizer", None) is None:
        return None
    if trainer.args.world_size > 1:  # the other ranks are not saving: a checkpoint's barriers would hang
        print("nbtune: data-parallel run stopped mid-step: no checkpoint saved now; resume from the last one",
              file=sys.stderr)
        return None
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.nbtune_checkpoint_reason = "keyboard_interrupt"
    trainer._save_checkpoint(trainer.model, trial=None)
    return getattr(trainer, "nbtune_last_checkpoint", None)
