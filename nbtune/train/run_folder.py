"""A run's output folder: one writer at a time, a record of the files nbtune wrote there, and no
previous run or file of the user's replaced unless asked.

- ``.nbtune.lock``: an advisory ``flock`` held while a run writes; a second process writing to the
  same folder is refused (the lock dies with its process, so a killed run leaves none behind).
- ``.nbtune-run.json``: the top-level files and folders nbtune wrote (``run.yaml``,
  ``metrics.jsonl``, ``adapter``, ``merged``). ``output.overwrite: true`` deletes those and nbtune's
  own checkpoints, nothing else; without it a fresh run into a folder that holds a previous run
  is refused with the three ways on.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from .checkpoint import complete_checkpoints, remove_own_checkpoints
from .config import ConfigError

RECORD = ".nbtune-run.json"
LOCK = ".nbtune.lock"
_held: dict[Path, int] = {}  # folder -> lock file descriptor, for this process


def own_files(out: Path) -> list[str]:
    try:
        return list(json.loads((Path(out) / RECORD).read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        return []


def record_written(out: Path, *names: str) -> None:
    """Add top-level names to the record of what nbtune wrote in ``out``."""
    files = list(dict.fromkeys([*own_files(out), *names]))
    tmp = Path(out) / (RECORD + ".tmp")
    tmp.write_text(json.dumps({"files": files}))
    os.replace(tmp, Path(out) / RECORD)


def lock(out: Path) -> None:
    """Take the folder's write lock (kept by this process until :func:`release`); a folder that
    another process is writing to is a :class:`ConfigError`."""
    out = Path(out).resolve()
    if out in _held:
        return  # this process holds it already (an earlier run here ended by an exception)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"output.dir: another nbtune run (process {holder}) is writing to {out}; wait for it to "
                          "finish or give this run another output.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[out] = fd


def release(out: Path) -> None:
    fd = _held.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)


def prepare_fresh(out: Path, overwrite: bool) -> None:
    """Before a fresh (not resumed) run writes into ``out``: refuse to replace a previous run or a
    file nbtune did not write, or (``overwrite``) delete what the previous run wrote."""
    out = Path(out)
    mine = own_files(out)
    foreign = [name for name in ("run.yaml", "metrics.jsonl", "adapter", "merged")
               if (out / name).exists() and name not in mine]
    if foreign:
        raise ConfigError(f"output.dir: {out} holds {', '.join(foreign)} that nbtune did not write; nbtune never "
                          "replaces files it did not write: give the run its own output.dir")
    previous = [name for name in mine if (out / name).exists()] + [p.name for p in complete_checkpoints(out)]
    if previous and not overwrite:
        raise ConfigError(f"output.dir: {out} holds a previous run ({', '.join(previous)}). Continue it with "
                          "resume, give this run another output.dir, or set output.overwrite: true (--overwrite) "
                          "to replace it (nbtune then deletes only the files it wrote there)")
    for name in mine:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    remove_own_checkpoints(out)
    (out / RECORD).write_text(json.dumps({"files": []}))  # what this run writes is added as it writes it


def releases_locks(fn):
    """Decorator: every folder lock taken during ``fn`` is released when it returns or raises."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            for folder in set(_held) - before:
                release(folder)
    return wrapper
