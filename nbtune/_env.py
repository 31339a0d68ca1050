"""nbtune's environment variables, read one way everywhere (torch-free, so the planner can use it).

``env_flag`` reads a yes/no switch; ``env_text`` a name or a mode. Each variable is read at the
moment it matters (tests and users may change it at run time), and each is named once: here when
two layers read it (NBTUNE_PATCH: the patches and the planner), else next to the code it switches.
"""
from __future__ import annotations

import os

# nbtune's architecture patches (nbtune.models.patches), on unless 0/false/no/off; the planner
# predicts memory for the path that will run.
PATCH_ENV = "NBTUNE_PATCH"


def env_text(name: str) -> str:
    """The variable's value with surrounding spaces removed; "" when unset."""
    return os.environ.get(name, "").strip()


def env_flag(name: str, default: bool) -> bool:
    """A yes/no environment variable. Unset, empty or unrecognised, it is ``default``. A variable
    that defaults to on is off only for 0/false/no/off; one that defaults to off is on only for
    1/true/yes/on. Case and surrounding spaces do not matter."""
    value = env_text(name).lower()
    return value not in ("0", "false", "no", "off") if default else value in ("1", "true", "yes", "on")
