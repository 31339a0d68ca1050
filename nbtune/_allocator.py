"""The CUDA caching-allocator setting nbtune asks for: expandable segments.

With torch's default allocator, a training step's large, changing-size blocks (dequantized
weights, the MLP's gate/up buffers, the loss chunk, the offload prefetches) are carved from
fixed-size segments, and freed pieces that do not fit the next request stay reserved: the
reserved peak (what ``nvidia-smi`` and an out-of-memory error see) sits hundreds of MiB above
the allocated peak. ``expandable_segments:True`` maps physical pages into one growing virtual
range per stream instead, so freed memory is reused for any size and the reserved peak stays
close to the allocated one. On a 15 GB T4 that difference is context length.

Applied by ``import nbtune`` (before any CUDA allocation, torch reads it at its first one), and
only when the user has not configured the allocator: ``PYTORCH_ALLOC_CONF`` (read by torch 2.10
and later) and ``PYTORCH_CUDA_ALLOC_CONF`` (older releases, still honoured) both unset.
``NBTUNE_ALLOCATOR=default`` leaves torch's own default. Should CUDA already be in use when
nbtune is imported, the setting goes through torch's allocator-settings call at run time,
which applies to segments made from then on. Platforms where the CUDA virtual-memory calls it
needs are missing (Windows, WSL) are left alone.
"""
from __future__ import annotations

import os
import platform
import sys

ENV = "NBTUNE_ALLOCATOR"
SETTING = "expandable_segments:True"
_USER_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def _unsupported_platform() -> bool:
    return os.name == "nt" or "microsoft" in platform.release().lower()


def _torch_reads_unified_variable() -> bool:
    """torch >= 2.10 reads PYTORCH_ALLOC_CONF (PYTORCH_CUDA_ALLOC_CONF still works, with a warning)."""
    try:
        from importlib.metadata import version

        major, minor = (int(part) for part in version("torch").split(".")[:2])
    except Exception:  # torch absent or an unusual version string: the older name works everywhere
        return False
    return (major, minor) >= (2, 10)


def _user_setting(environ) -> str | None:
    """The allocator setting the user gave (PYTORCH_ALLOC_CONF, else its older name), or None."""
    return next((environ[name].strip() for name in _USER_VARIABLES if environ.get(name)), None)


def _left_to_torch(environ) -> bool:
    """nbtune leaves torch's default: opted out (NBTUNE_ALLOCATOR=default) or Windows / WSL."""
    return environ.get(ENV, "").strip().lower() == "default" or _unsupported_platform()


def effective_setting(environ=os.environ) -> str:
    """The allocator setting a run in this environment gets: the user's, else nbtune's expandable
    segments, else "default" (torch's own) where nbtune leaves it alone."""
    user = _user_setting(environ)
    if user is not None:
        return user
    return "default" if _left_to_torch(environ) else SETTING


def configure_allocator(environ=os.environ) -> str | None:
    """Ask torch for expandable segments unless the user configured the allocator or opted out.
    Returns how it was applied ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "runtime") or None."""
    if _left_to_torch(environ) or _user_setting(environ) is not None:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.cuda, "is_initialized", lambda: False)():
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        if setter is None:  # torch < 2.9
            setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
        try:
            setter(SETTING)
        except Exception:  # private API: a torch without it keeps its default
            return None
        return "runtime"
    name = "PYTORCH_ALLOC_CONF" if _torch_reads_unified_variable() else "PYTORCH_CUDA_ALLOC_CONF"
    environ[name] = SETTING
    return name
