"""Out of GPU memory during a run: release what the run held, then one clear error with the
planner's advice; the kernel stays usable.

A CUDA out-of-memory error escaping a run carries a traceback whose frames hold the trainer, the
optimizer state, the LoRA model and the activations of the failed step. :func:`release_run_memory`
clears those frames, takes the failed run's LoRA layers off the cached base model (the base stays
loaded for the next run; ``nbtune.train.session.clear()`` frees it too), collects garbage and
empties torch's cache, so ``torch.cuda.memory_allocated()`` is back where it was before the run
(plus the base model, when this run loaded it into the session's cache).
The run then raises :class:`GPUOutOfMemoryError`, outside the handler, so the original error
(and its frames) is not kept as its context.

The advice comes from the planner (:mod:`nbtune.planner`): when it predicted that the run does not
fit, its smallest change that fits; when it predicted a fit, the run found less memory than
planned (another process, fragmentation, longer rows than planned), so the advice is planned for
a GPU shrunk by the shortfall this run met.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import gc
import re
import traceback
from typing import Callable

import torch

from . import session

GiB = 2**30
_SIZE = r"([\d.]+)\s*(KiB|MiB|GiB|TiB)"
_UNITS = {"KiB": 2**-20, "MiB": 2**-10, "GiB": 1.0, "TiB": 2**10}
FALLBACK_ADVICE = ("lower train.batch_size (raise train.grad_accum to keep the rows per step), lower "
                   "model.max_seq_length, use train.gradient_checkpointing: offload and keep model.load_in_4bit: true")


class GPUOutOfMemoryError(RuntimeError):
    """The GPU ran out of memory during a run. The run's memory has been released; the message
    says where it happened (``phase``, ``step``: optimizer steps completed) and what to change
    (``advice``, the planner's)."""

    def __init__(self, message: str, phase: str, step: int | None, advice: str):
        super().__init__(message)
        self.phase = phase
        self.step = step
        self.advice = advice


# what a run was doing, by the function it had called when the error came
PHASES = {"get_base_model": "loading the model", "_load_base": "loading the model",
          "load_model": "loading the model", "add_lora": "adding the LoRA layers",
          "prepare_data": "preparing the data", "__init__": "setting up the trainer", "evaluate": "evaluating",
          "train": "training", "save_adapter": "saving the adapter", "save_merged": "saving the merged model"}


@dataclasses.dataclass
class OOMFailure:
    """What a run that ran out of memory was doing: its config, phase, step and torch's text."""

    cfg: object
    phase: str
    step: int | None  # optimizer steps completed
    max_steps: int | None
    detail: str
    peft_id: int | None = None  # id() of the run's PeftModel (no reference: it must be freed)


# the run function's phases (nbtune/train/run.py): an error inside one is read from that frame
RUN_STAGES = ("prepare", "train", "finish")


def describe_failure(exc: BaseException, code) -> OOMFailure:
    """Read, from the traceback of ``exc``, the frame of the run function (``code``), or of the stage
    of it that was running (:data:`RUN_STAGES`): its config, the call it was in (the phase) and its
    trainer's step. Call before the frames are cleared."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code is not code:
        tb = tb.tb_next
    if tb is None:
        return OOMFailure(None, "preparing the run", None, None, str(exc))
    if tb.tb_next is not None and tb.tb_next.tb_frame.f_code.co_name in RUN_STAGES:
        tb = tb.tb_next
    local = tb.tb_frame.f_locals
    run = local.get("run")  # the stages after the first hold the run
    callee = tb.tb_next.tb_frame.f_code.co_name if tb.tb_next is not None else ""
    state = getattr(local.get("trainer") or getattr(run, "trainer", None), "state", None)
    peft_model = local.get("peft_model") or getattr(run, "model", None)
    return OOMFailure(local.get("cfg") or getattr(run, "cfg", None), PHASES.get(callee, "preparing the run"),
                      getattr(state, "global_step", None), getattr(state, "max_steps", None), str(exc),
                      id(peft_model) if peft_model is not None else None)


def is_cuda_oom(exc: BaseException) -> bool:
    """True for torch's CUDA OOM error and the RuntimeErrors some libraries raise for it."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _gib(match) -> float:
    return float(match.group(1)) * _UNITS[match.group(2)]


def needed_gib(detail: str) -> float | None:
    """From torch's OOM text: memory in use on the GPU plus the allocation that failed (GiB)."""
    tried = re.search(r"Tried to allocate " + _SIZE, detail)
    total = re.search(r"total capacity of " + _SIZE, detail)
    free = re.search(r"of which " + _SIZE + r" is free", detail)
    if not (tried and total and free):
        return None
    return _gib(total) - _gib(free) + _gib(tried)


def oom_advice(cfg, detail: str = "", gpu=None) -> str:
    """The planner's advice for a run of ``cfg`` that ran out of memory (``detail``: torch's text)."""
    try:
        from ..planner import PlannerError, plan_from_config
    except ImportError:  # pragma: no cover - the planner ships with nbtune
        return FALLBACK_ADVICE
    if gpu is None:
        gpu = "auto" if torch.cuda.is_available() else "T4"
    try:
        plan = plan_from_config(cfg, gpu=gpu)
        if not plan.fits:
            return "the planner: " + plan.suggest().message
        needed = needed_gib(detail)
        if needed is None or needed <= plan.peak_gib:
            needed = plan.peak_gib * 1.25  # short by an unknown amount: plan for a quarter more
        # the GPU as this run found it: torch's share shrunk by the shortfall, the context and margin kept
        share = plan.reserved_gib * plan.peak_gib / needed
        found = dataclasses.replace(plan.gpu, name=f"{plan.gpu.name} (as this run found it)",
                                    total_gib=plan.gpu.context_gib + share + plan.required_margin_gib)
        # the checkpointing the run used, by name: "auto" would pick again for the smaller GPU, and
        # the advice must say so when the mode has to change
        advice = plan.replace(gpu=found, gradient_checkpointing=plan.settings.gradient_checkpointing).suggest().message
        return (f"the planner expected a peak of {plan.peak_gib:.2f} GiB and the run needed about {needed:.2f} GiB "
                f"(another process on the GPU, fragmentation, or longer rows than planned); planned for the "
                f"memory it found: {advice}")
    except PlannerError as e:
        return f"{FALLBACK_ADVICE} (the planner has no plan for this model: {e})"
    except Exception as e:  # the advice must never hide the out-of-memory error itself
        return f"{FALLBACK_ADVICE} (the planner failed: {type(e).__name__}: {e})"


def _clear_exception_frames(exc: BaseException | None) -> None:
    """Drop the local variables of the finished frames in the tracebacks of ``exc`` and of the
    errors chained to it (the traceback's lines stay)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def release_run_memory(exc: BaseException | None = None, peft_id: int | None = None) -> None:
    """Free what a failed run held on the GPU: the frames of ``exc`` (trainer, optimizer,
    activations), the run's LoRA layers and gradients on the cached base (when the session's
    PeftModel is the run's, ``id() == peft_id``), and torch's cache."""
    _clear_exception_frames(exc)
    peft_model = session._SLOT.get("peft")
    if peft_model is not None and peft_id is not None and id(peft_model) == peft_id:
        for p in peft_model.parameters():
            p.grad = None
        session.release_adapter()
    del peft_model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_error(failure: OOMFailure, gpu=None) -> GPUOutOfMemoryError:
    """The error a run raises after running out of GPU memory (after :func:`release_run_memory`)."""
    cfg, where = failure.cfg, failure.phase
    if failure.phase == "training" and failure.step is not None:
        where = f"training at step {failure.step + 1}" + (f" of {failure.max_steps}" if failure.max_steps else "")
    first = failure.detail.strip().splitlines()[0] if failure.detail.strip() else "CUDA out of memory"
    advice = oom_advice(cfg, failure.detail, gpu) if cfg is not None else FALLBACK_ADVICE
    settings = (f" (train.batch_size: {cfg.train.batch_size}, model.max_seq_length: {cfg.model.max_seq_length})"
                if cfg is not None else "")
    message = (f"the GPU ran out of memory while {where}{settings}. Advice: {advice}. The run's GPU memory was "
               f"released and the kernel is still usable: change the config and run again. "
               f"torch said: {first[:240]}")
    return GPUOutOfMemoryError(message, failure.phase, failure.step, advice)


def released_on_oom(run: Callable) -> Callable:
    """Decorator for the run function: a CUDA out-of-memory error inside it releases the run's
    memory and becomes a :class:`GPUOutOfMemoryError` with the planner's advice. A run stopped
    for NaN/inf (:class:`~nbtune.train.stability.TrainingDivergedError`) goes on as it is, with
    the run's frames cleared, so the error a notebook keeps does not keep the trainer alive."""
    from .stability import TrainingDivergedError

    @functools.wraps(run)
    def guarded(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        except TrainingDivergedError as exc:
            _clear_exception_frames(exc)
            raise
        except Exception as exc:
            if not is_cuda_oom(exc):
                raise
            failure = describe_failure(exc, inspect.unwrap(run).__code__)  # the run's own frame, under its other decorators
            release_run_memory(exc, failure.peft_id)
        # raised here, outside the handler: the original error and its frames are not its context
        raise oom_error(failure)

    return guarded
