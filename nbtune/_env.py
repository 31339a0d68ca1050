"""nbtune's environment variables, read one way everywhere (torch-free, so the planner can use it).

``env_flag`` reads a yes/no switch; ``env_text`` a name or a mode; ``env_raw`` the value as it is.
Each variable is read at the moment it matters (tests and users may change it at run time), and
each is named once: here when two layers read it (NBTUNE_PATCH: the patches and the planner), else
next to the code it switches.

Some are read per kernel call, ~500 times a training step. ``os.environ.get`` encodes the name,
looks it up, decodes the value (and raises and catches a KeyError for an unset name): ~1-2 µs.
Here the name is encoded once and the value's text is kept with the raw bytes it came from, so a
read is one dict lookup and a comparison; a changed value is seen at the next read, as before.
"""
from __future__ import annotations

import os

_ENVIRON = os.environ
_DATA = getattr(_ENVIRON, "_data", None)  # CPython's mapping of encoded names to encoded values
_ENCODE = getattr(_ENVIRON, "encodekey", None)
_DECODE = getattr(_ENVIRON, "decodevalue", None)
_KEYS: dict[str, object] = {}  # name -> encoded name
_SEEN: dict[str, tuple] = {}  # name -> (raw value, decoded value) of the last read


def env_raw(name: str) -> str | None:
    """``os.environ.get(name)``: the value as set, None when unset."""
    if os.environ is not _ENVIRON or _DATA is None or _ENCODE is None or _DECODE is None:
        return os.environ.get(name)  # os.environ replaced (a test), or not CPython's mapping
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = _ENCODE(name)
    raw = _DATA.get(key)
    seen = _SEEN.get(name)
    if seen is not None and seen[0] == raw:
        return seen[1]
    value = None if raw is None else _DECODE(raw)
    _SEEN[name] = (raw, value)
    return value

# nbtune's architecture patches (nbtune.models.patches), on unless 0/false/no/off; the planner
# predicts memory for the path that will run.
PATCH_ENV = "NBTUNE_PATCH"


def env_text(name: str) -> str:
    """The variable's value with surrounding spaces removed; "" when unset."""
    value = env_raw(name)
    return "" if value is None else value.strip()


def env_flag(name: str, default: bool) -> bool:
    """A yes/no environment variable. Unset, empty or unrecognised, it is ``default``. A variable
    that defaults to on is off only for 0/false/no/off; one that defaults to off is on only for
    1/true/yes/on. Case and surrounding spaces do not matter."""
    value = env_text(name).lower()
    return value not in ("0", "false", "no", "off") if default else value in ("1", "true", "yes", "on")
