"""Yes/no environment variables: one reading for every switch nbtune has (NBTUNE_PATCH,
NBTUNE_GC_FREEZE, NBTUNE_OFFLOAD_TIMING, NBTUNE_VERBOSE). Torch-free, so the command line and
``nbtune.quiet`` can read a switch without importing the kernels."""
from __future__ import annotations

import os


def env_flag(name: str, default: bool) -> bool:
    """A yes/no environment variable. Unset, empty or unrecognised, it is ``default``. A variable
    that defaults to on is off only for 0/false/no/off; one that defaults to off is on only for
    1/true/yes/on. Case and surrounding spaces do not matter."""
    value = os.environ.get(name, "").strip().lower()
    return value not in ("0", "false", "no", "off") if default else value in ("1", "true", "yes", "on")
