"""The versions a run depends on: nbtune, Python and the training stack (torch, transformers,
peft, trl, bitsandbytes, triton).

One place says them, for ``nbtune --version``, the ``start`` record of ``metrics.jsonl`` and the
dry run's report, so a bug report or a log read later names the exact stack. Read from the
installed packages' metadata (importlib.metadata): nothing heavy is imported, and a package that
is not installed is None.
"""
from __future__ import annotations

import platform
from importlib import metadata

# the stack's packages, each with the distributions that provide it (first installed one wins)
STACK = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "peft": ("peft",),
    "trl": ("trl",),
    "bitsandbytes": ("bitsandbytes",),
    "triton": ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-windows"),
}


def _installed(distributions) -> str | None:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def stack_versions() -> dict[str, str | None]:
    """{"nbtune": ..., "python": ..., "torch": ..., ...}: the version of each, None where not installed."""
    from . import __version__

    found = {"nbtune": __version__, "python": platform.python_version()}
    found.update({package: _installed(dists) for package, dists in STACK.items()})
    return found


def stack_line(versions: dict[str, str | None] | None = None) -> str:
    """One line: "torch 2.13.0, transformers 5.17.0, ..., triton not installed" (the stack only)."""
    versions = stack_versions() if versions is None else versions
    return ", ".join(f"{name} {versions.get(name) or 'not installed'}" for name in STACK)


def version_text() -> str:
    """``nbtune --version``: nbtune's version, then Python and each package of the stack on a line."""
    versions = stack_versions()
    width = max(len(name) for name in versions)
    lines = [f"nbtune {versions.pop('nbtune')}"]
    lines += [f"  {name:<{width}}  {version or 'not installed'}" for name, version in versions.items()]
    return "\n".join(lines)
