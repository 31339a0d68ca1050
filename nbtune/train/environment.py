"""What this machine can do for a run, said before anything loads.

- No CUDA GPU: the run trains on the CPU (float32 unless model.dtype says otherwise);
  :func:`cpu_note` says so, and which settings of the config fall back (4-bit weights, 8-bit
  optimizers) and why.
- bitsandbytes: on a GPU, 4-bit weights and the 8-bit optimizers need it; :func:`check_bitsandbytes`
  turns a missing or broken install into one message with the fix, before the model loads.
- bf16 on a GPU without it: decided by :func:`nbtune.models.loader.choose_dtype` (fp16 with a note).
"""
from __future__ import annotations

from .config import Config

CPU_NOTE = ("nbtune: no CUDA GPU here: training on the CPU in {dtype}. That is fine for the embedded 135M model "
            "and small tests, far too slow for a 7-8B model (use a GPU runtime, e.g. Colab: Runtime > Change "
            "runtime type > T4 GPU)")


def cpu_changes(cfg: Config) -> list[str]:
    """The settings of ``cfg`` that a CPU run replaces, each with what it becomes and why."""
    changes = []
    if cfg.model.load_in_4bit:
        changes.append("model.load_in_4bit: true -> full-precision weights (4-bit training needs a CUDA GPU)")
    if "8bit" in cfg.train.optimizer:
        changes.append(f"train.optimizer: {cfg.train.optimizer} -> adamw (8-bit optimizers need a CUDA GPU)")
    return changes


def cpu_note(cfg: Config) -> str:
    """One note for a run of ``cfg`` on a machine without a CUDA GPU."""
    changes = cpu_changes(cfg)
    dtype = "float32" if cfg.model.dtype == "auto" else cfg.model.dtype
    return CPU_NOTE.format(dtype=dtype) + (". Instead of: " + "; ".join(changes) if changes else "")


def check_bitsandbytes(cfg: Config, cuda: bool) -> None:
    """On a GPU, a :class:`~nbtune.models.ModelLoadError` with the fix when the config needs
    bitsandbytes (4-bit weights, an 8-bit optimizer) and it is missing or broken."""
    from ..models.loader import require_bitsandbytes

    if not cuda:
        return  # the CPU path uses neither (a pre-quantized checkpoint is checked when it loads)
    if cfg.model.load_in_4bit is not False:
        require_bitsandbytes("4-bit loading (model.load_in_4bit; on a GPU it defaults to true)")
    if "8bit" in cfg.train.optimizer:
        require_bitsandbytes(f"train.optimizer: {cfg.train.optimizer}")
