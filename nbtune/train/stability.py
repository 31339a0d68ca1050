"""NaN / inf in training: a step whose loss or gradients are not finite is skipped, never trained
on; a run stuck on them stops with a message and keeps its last good checkpoint.

How a step is judged (once per optimizer step, after the gradients are unscaled and clipped,
before the optimizer runs; one device synchronization, where the verdict is read):

- the loss is NaN/inf (on any micro-batch of the step) -> a *non-finite step*;
- the loss is finite but the gradients are not:
  - under fp16 loss scaling (a ``GradScaler``) this is an *overflow*: the scaler skips the
    optimizer step and halves the loss scale; that is its normal search for a scale that fits
    fp16, so an overflow counts as non-finite only once the scale is at or below
    :data:`MIN_LOSS_SCALE` (even unscaled gradients overflow);
  - without a scaler (fp32, bf16) -> a non-finite step.

The gradients are judged by the norm the trainer measured before clipping (``_get_grad_norm``,
handed over by :class:`RecordsStepLoss`): the norm of all gradients is NaN/inf exactly when one of
them holds a NaN/inf (or when finite gradients are so large that their norm overflows, and then
clipping would have scaled them all to zero). A trainer that hands no norm over gets one fused
pass over the trainable parameters' gradients instead; those parameters are listed once per run.

A non-finite step is skipped: with a scaler the scaler skips it; without one the gradients are
dropped (``grad = None``, which every torch optimizer passes over, so weights and optimizer state
stay as the last good step left them). No checkpoint is written at a skipped step. After
``train.max_nonfinite_steps`` non-finite steps in a row (default 3) the run stops: the guard ends
training, the run saves the adapter of the last good step and raises
:class:`TrainingDivergedError` naming the steps, the last good checkpoint and what to change.

Each skipped step is written to the metrics stream as a ``skipped`` record (step, reason, loss
scale) and a ``diverged`` record marks the stop. Under data parallelism the per-rank "loss was
finite" flags are combined (all-reduce MIN), so every rank judges a step the same way.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from . import distributed

MIN_LOSS_SCALE = 1.0


class TrainingDivergedError(RuntimeError):
    """Training stopped because the loss or gradients stayed NaN/inf; nothing after the last good
    step was trained on, and its checkpoint and adapter are kept."""

    def __init__(self, message: str, steps: list[int], checkpoint: Path | None, adapter_dir: Path | None):
        super().__init__(message)
        self.steps = steps
        self.checkpoint = checkpoint
        self.adapter_dir = adapter_dir


class RecordsStepLoss:
    """Trainer mixin: hands each micro-batch's loss, and each optimizer step's gradient norm, to
    ``self.nbtune_guard`` (a :class:`NonFiniteGuard`), and starts each logging window's loss sum
    from zero again after a NaN/inf one: the Trainer resets it with ``tr_loss -= tr_loss``, which
    keeps a NaN, so every loss logged after one skipped step would read NaN."""

    nbtune_guard = None

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.nbtune_guard is not None:
            self.nbtune_guard.record_loss(loss)
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        logs = self.control.should_log and self.state.global_step > self._globalstep_last_logged
        out = super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
        if logs:  # the window was logged (and "reset"): a NaN/inf sum starts over at 0 (no device sync)
            tr_loss.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return out

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.nbtune_guard is not None:
            self.nbtune_guard.record_grad_norm(grad_norm)
        return grad_norm


def _all_finite(tensors) -> torch.Tensor | None:
    """One boolean tensor: every value of every tensor is finite (None for no tensors)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return None
    norms = torch._foreach_norm(tensors)  # a NaN/inf anywhere makes its tensor's norm NaN/inf
    return torch.isfinite(torch.stack([n.float() for n in norms]).sum())


class NonFiniteGuard(TrainerCallback):
    """Skips optimizer steps with a NaN/inf loss or NaN/inf gradients and stops the run after
    ``patience`` of them in a row (see the module docstring)."""

    def __init__(self, patience: int = 3, notify: Callable[[dict], None] | None = None):
        if patience < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {patience}")
        self.patience = patience
        self.notify = notify
        self.streak: list[int] = []  # the non-finite steps in a row, up to now
        self.skipped: list[dict] = []  # every skipped step: step, reason, loss_scale
        self.stopped_at: int | None = None
        self.last_good_step = 0
        self._loss_finite: torch.Tensor | None = None
        self._grad_norm = None  # this step's gradient norm, when the trainer hands it over
        self._skipped_now = False
        self._params: tuple | None = None  # (model, its trainable parameters), listed once per run

    # ------------------------------------------------------------------ what the trainer reports
    def record_loss(self, loss) -> None:
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss))
        ok = torch.isfinite(loss.detach()).all()
        self._loss_finite = ok if self._loss_finite is None else (self._loss_finite & ok)

    def record_grad_norm(self, norm) -> None:
        """The step's gradient norm before clipping (a tensor or a number; None: not measured)."""
        self._grad_norm = norm

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_good_step = state.global_step  # a resumed run starts from a good checkpoint
        self._params = None  # listed again for this run
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._loss_finite = None
        self._grad_norm = None
        self._skipped_now = False
        return control

    def _trainable(self, model) -> list:
        if model is None:
            return []
        if self._params is None or self._params[0] is not model:
            self._params = (model, [p for p in model.parameters() if p.requires_grad])
        return self._params[1]

    def _grads_finite(self, params) -> torch.Tensor | None:
        norm = self._grad_norm
        if isinstance(norm, torch.Tensor):
            return torch.isfinite(norm.detach()).all()
        if isinstance(norm, (int, float)):
            return torch.tensor(math.isfinite(norm))
        return _all_finite([p.grad for p in params])

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = self._trainable(model)
        grads_finite = self._grads_finite(params)
        known = [x for x in (self._loss_finite, grads_finite) if x is not None]
        device = next((x.device for x in reversed(known) if x.device.type != "cpu"), torch.device("cpu"))
        flags = torch.stack([(x if x is not None else torch.tensor(True)).to(device, torch.float32)
                             for x in (self._loss_finite, grads_finite)])
        distributed.all_reduce_(flags, "min")  # every rank judges alike
        loss_ok, grads_ok = (x > 0.5 for x in flags.tolist())  # the one device sync per optimizer step
        step = state.global_step + 1
        if loss_ok and grads_ok:
            self.streak = []
            self.last_good_step = step
            return control
        scaler = getattr(optimizer, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        if scale is not None and loss_ok:
            reason = f"fp16 gradients overflowed at loss scale {scale:g}; the loss scaler skips the step"
            counts = scale <= MIN_LOSS_SCALE
        else:
            reason = ("the loss is NaN/inf" if not loss_ok else "the gradients are NaN/inf") + "; step skipped"
            counts = True
            if scale is None:  # no scaler to skip it: drop the gradients, the optimizer passes over them
                for p in params:
                    p.grad = None
        self._skipped_now = True
        record = dict(event="skipped", step=step, max_steps=state.max_steps, reason=reason, loss_scale=scale)
        self.skipped.append(record)
        if counts:
            self.streak.append(step)
        print(f"nbtune: step {step}: {reason} (not trained on)", file=sys.stderr)
        if self.notify is not None:
            self.notify(record)
        if len(self.streak) >= self.patience:
            self.stopped_at = step
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._skipped_now:
            control.should_save = False  # a skipped step's checkpoint would replace a good one for nothing
        if self.stopped_at is not None:
            control.should_training_stop = True
            control.should_save = False
        return control

    # ------------------------------------------------------------------ after the stop
    def message(self, lr: float, dtype: str, checkpoint: Path | None, adapter_dir: Path | None) -> str:
        steps = ", ".join(str(s) for s in self.streak)
        kept = []
        if checkpoint is not None:
            kept.append(f"the last good checkpoint {checkpoint} (resume=True / --resume continues from it)")
        if adapter_dir is not None:
            kept.append(f"the adapter of step {self.last_good_step} in {adapter_dir}")
        fixes = [f"lower train.lr (now {lr:g})", "check the data rows of those steps"]
        if dtype in ("auto", "float16"):
            fixes.append("on a GPU with bf16 use model.dtype: bfloat16, elsewhere float32")
        return (f"training stopped at step {self.stopped_at}: the loss or gradients were NaN/inf at steps {steps} "
                f"({len(self.streak)} in a row; train.max_nonfinite_steps: {self.patience}). Those steps were "
                f"skipped, not trained on. Kept: " + ("; ".join(kept) if kept else "nothing (no good step yet)")
                + ". Try: " + "; ".join(fixes) + ".")


def weights_finite(model) -> bool:
    """True when every trainable parameter is finite (the adapter is worth saving)."""
    ok = _all_finite([p.detach() for p in model.parameters() if p.requires_grad])
    return True if ok is None else bool(ok)


def stop_diverged(guard: NonFiniteGuard, cfg, peft_model, tokenizer, out: Path, checkpoint: Path | None,
                  emit: Callable[[dict], None] | None = None, save: bool = True) -> TrainingDivergedError:
    """After the guard stopped a run: save the adapter of the last good step (its weights are those
    of the last good step, since every non-finite step was skipped; ``save=False`` on ranks other
    than 0), log a ``diverged`` record and return the error to raise."""
    from .generate import save_adapter

    adapter_dir = None
    if save and guard.last_good_step > 0 and weights_finite(peft_model):
        adapter_dir = save_adapter(peft_model, tokenizer, Path(out) / "adapter")
    text = guard.message(cfg.train.lr, cfg.model.dtype, checkpoint, adapter_dir)
    if emit is not None:
        emit(dict(event="diverged", step=guard.stopped_at, steps=list(guard.streak),
                  checkpoint=str(checkpoint) if checkpoint else None, last_good_step=guard.last_good_step))
    return TrainingDivergedError(text, list(guard.streak), checkpoint, adapter_dir)



class TrainingCollapsedError(TrainingDivergedError):
    """Training ran to its end but left nothing usable: non-finite LoRA weights, or a model that
    predicts every token alike (loss at ln(vocabulary) with zero gradients). No adapter is saved."""


def collapse_problem(model, records: list[dict], vocab_size: int | None) -> str | None:
    """What makes a finished run's result unusable, or None. Checked once, after the last step."""
    if not weights_finite(model):
        return "its LoRA weights are not finite (NaN/inf)"
    train = [r for r in records if r.get("event") == "train" and r.get("loss") is not None]
    if vocab_size and len(train) >= 2:
        last = train[-2:]
        uniform = math.log(vocab_size)
        if all(abs(r["loss"] - uniform) <= 0.02 * uniform and r.get("grad_norm") == 0 for r in last):
            return (f"it collapsed: the loss sits at ln(vocabulary size) = {uniform:.3f} with zero gradient norm, so "
                    "the model predicts every token alike and learns nothing more")
    return None


def collapsed_error(problem: str, cfg, checkpoint: Path | None) -> TrainingCollapsedError:
    where = f" The last checkpoint, {checkpoint}, may predate the collapse." if checkpoint else ""
    text = (f"nbtune: the run finished but {problem}; no adapter was saved. This usually means train.lr "
            f"({cfg.train.lr:g}) is far too high: try 2e-4 for LoRA (1e-4 for large ranks) and start a new run."
            + where)
    return TrainingCollapsedError(text, [], checkpoint, None)
