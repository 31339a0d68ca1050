"""nbtune.planner: will a fine-tune fit the GPU and the machine's RAM, before anything is loaded.
Pure Python (no torch).

    import nbtune
    p = nbtune.plan("llama-3.1-8b", gpu="colab-t4", seq_len=2048, batch_size=1, lora_rank=16)
    p.fits, p.peak_gib, p.breakdown, p.suggest(), p.to_yaml(magic=True)
    p.host_peak_gib, p.host_breakdown, p.host_fits   # host RAM (None: a bare GPU, its host unknown)

Command line: ``nbtune plan llama-3.1-8b --gpu colab-t4 --seq-len 2048 --batch-size 1``.
The GPU memory model and its coefficients: :mod:`nbtune.planner.memory`; their fit to GPU
measurements: :mod:`nbtune.planner.calibration` (the measuring harness: benchmarks/calibrate.py).
Host RAM: :mod:`nbtune.planner.host_memory` (the terms) and :mod:`nbtune.planner.host` (reading the
machine's RAM: /proc/meminfo, cgroup limits); the platforms' profiles: :data:`PROFILES`.
"""
from .gpus import CATALOG as GPUS
from .gpus import GPU, PROFILES, detect_gpu, gpu_names, planned_gpu, resolve_gpu
from .host import HostMemory, detect_host
from .host_memory import HOST_TERMS
from .memory import TERMS, Coefficients, coefficients
from .plan import (CheckpointingChoice, DoesNotFitError, Plan, Suggestion, auto_checkpointing, checkpointing_for_run,
                   choose_checkpointing, plan, plan_from_config, preflight)
from .shapes import CATALOG as MODELS
from .shapes import ModelShape, PlannerError, catalog_names, resolve_shape, shape_from_config

__all__ = [
    "GPU", "GPUS", "HOST_TERMS", "MODELS", "PROFILES", "TERMS", "CheckpointingChoice", "Coefficients",
    "DoesNotFitError", "HostMemory", "ModelShape", "Plan", "PlannerError", "Suggestion", "auto_checkpointing",
    "catalog_names", "checkpointing_for_run", "choose_checkpointing", "coefficients", "detect_gpu", "detect_host",
    "gpu_names", "plan", "plan_from_config", "planned_gpu", "preflight", "resolve_gpu", "resolve_shape",
    "shape_from_config",
]
