"""nbtune.planner: will a fine-tune fit the GPU, before anything is loaded. Pure Python (no torch).

    import nbtune
    p = nbtune.plan("llama-3.1-8b", gpu="T4", seq_len=2048, batch_size=1, lora_rank=16)
    p.fits, p.peak_gib, p.breakdown, p.suggest(), p.to_yaml(magic=True)

Command line: ``nbtune plan llama-3.1-8b --gpu T4 --seq-len 2048 --batch-size 1``.
The memory model and its coefficients: :mod:`nbtune.planner.memory`; their fit to GPU measurements:
:mod:`nbtune.planner.calibration` (the measuring harness: benchmarks/calibrate.py).
"""
from .gpus import CATALOG as GPUS
from .gpus import GPU, detect_gpu, gpu_names, planned_gpu, resolve_gpu
from .memory import TERMS, Coefficients, coefficients
from .plan import (DoesNotFitError, Plan, Suggestion, auto_checkpointing, checkpointing_for_run, choose_checkpointing,
                   plan, plan_from_config, preflight)
from .shapes import CATALOG as MODELS
from .shapes import ModelShape, PlannerError, catalog_names, resolve_shape, shape_from_config

__all__ = [
    "GPU", "GPUS", "MODELS", "TERMS", "Coefficients", "DoesNotFitError", "ModelShape", "Plan", "PlannerError",
    "Suggestion", "auto_checkpointing", "catalog_names", "checkpointing_for_run", "choose_checkpointing",
    "coefficients", "detect_gpu", "gpu_names", "plan", "plan_from_config", "planned_gpu", "preflight", "resolve_gpu",
    "resolve_shape", "shape_from_config",
]
