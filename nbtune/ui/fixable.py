"""Which nbtune errors a user fixes by changing something (the config, the data, the model, the
memory plan, the batch size after an OOM, the learning rate after a divergence, the disk's room). The notebook
doors show those as their message alone (no traceback), because the message says what to change;
any other error keeps its traceback. One list for the magic, the command line (its exit code and
message) and the data-parallel launcher, which judges each rank's error by the same rule (the rank
records the verdict in its error report). Errors are matched by class name (nbtune's own classes
only), so that checking needs no import: a ``--gpus`` launch must keep the training stack (and
with it bitsandbytes) out of the kernel, and ``nbtune plan`` must not import torch."""
from __future__ import annotations

# Bad input, found before or while setting up: the message names the field and the fix.
INPUT_ERRORS = frozenset({"ConfigError", "DataError", "AssetError", "ModelLoadError", "DistributedSetupError",
                          "ExportError"})
# The memory planner's answer: the message is the plan and its advice (several lines).
PLAN_ERRORS = frozenset({"PlannerError", "DoesNotFitError"})
# A run that started and stopped on what the user changes (out of GPU memory, NaN/inf loss, a full disk).
RUN_ERRORS = frozenset({"GPUOutOfMemoryError", "TrainingDivergedError", "DiskFullError"})
FIXABLE = INPUT_ERRORS | PLAN_ERRORS | RUN_ERRORS


def fixable_kind(error: BaseException) -> str | None:
    """"input", "plan" or "run" for an nbtune error (its class or a base, from an ``nbtune.`` module)
    in one of the lists above; None for any other error."""
    for c in type(error).__mro__:
        if c.__module__.startswith("nbtune."):
            for kind, names in (("input", INPUT_ERRORS), ("plan", PLAN_ERRORS), ("run", RUN_ERRORS)):
                if c.__name__ in names:
                    return kind
    return None


def is_fixable(error: BaseException) -> bool:
    """True for an nbtune error named in FIXABLE, and for a launch whose ranks hit one of them
    (``LaunchError.fixable``)."""
    if type(error).__name__ == "LaunchError":
        return bool(getattr(error, "fixable", False))
    return fixable_kind(error) is not None
