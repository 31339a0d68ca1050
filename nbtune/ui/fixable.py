"""Which nbtune errors a user fixes by changing something (the config, the data, the model, the
memory plan, the batch size after an OOM, the learning rate after a divergence, the disk's room). The notebook
doors show those as their message alone (no traceback), because the message says what to change;
any other error keeps its traceback. One list for the magic and the data-parallel launcher, which
judges each rank's error by the same rule (the rank records the verdict in its error report).
Errors are matched by class name (nbtune's own classes only), so that checking needs no import: a
``--gpus`` launch must keep the training stack (and with it bitsandbytes) out of the kernel."""
from __future__ import annotations

FIXABLE = frozenset({
    "ConfigError", "DataError", "AssetError", "ModelLoadError", "PlannerError", "DoesNotFitError",
    "DistributedSetupError", "GPUOutOfMemoryError", "TrainingDivergedError", "DiskFullError",
})


def is_fixable(error: BaseException) -> bool:
    """True for an nbtune error (its class or a base, from an ``nbtune.`` module) named in FIXABLE, and
    for a launch whose ranks hit one of them (``LaunchError.fixable``)."""
    if type(error).__name__ == "LaunchError":
        return bool(getattr(error, "fixable", False))
    return any(c.__name__ in FIXABLE and c.__module__.startswith("nbtune.") for c in type(error).__mro__)
