"""A full disk while a run writes (ENOSPC): one message that says the disk is full, which file was
being written in which folder, how much room the run needs and what is kept.

Libraries report a full disk in their own words: an ``OSError`` with errno ENOSPC (``open``),
safetensors' "No space left on device (os error 28)", or, from ``torch.save``, only "unexpected
pos" / "file write failed". So an error counts as a full disk when its chain says so, or when it
was raised by a write and the output folder's disk has (almost) no room left.

The file is the innermost path under the output folder that the failing call stack was writing
(a local ``filename`` / ``path``, or an open file's name); one in a checkpoint's staging folder is
said to belong to the new checkpoint. What is needed is measured from the last complete checkpoint
when there is one, else estimated from the trainable parameters (adapter fp32, optimizer state)
and the tokenizer files. :func:`explains_full_disk` wraps ``finetune``; :func:`track` (called once
the model is ready) gives it the run's output folder, config and model.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import shutil
from pathlib import Path

from .checkpoint import checkpoints_dir, latest_checkpoint

FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "storagefull")
NEARLY_FULL_BYTES = 256 * 1024  # a write failing with less room than this: the disk is full
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "added_tokens.json")

_RUN: dict = {}


class DiskFullError(OSError):
    """The disk of the output folder filled up while the run wrote to it; the message says which
    file, how much room is needed and what is kept. ``checkpoint``: the last complete one (or None)."""

    def __init__(self, message: str, path: Path | None, checkpoint: Path | None):
        super().__init__(errno.ENOSPC, message)
        self.message, self.path, self.checkpoint = message, path, checkpoint

    def __str__(self) -> str:
        return self.message


def track(out: Path, cfg, model=None) -> None:
    """What a full disk's message needs about the current run (set once its model is ready)."""
    _RUN.update(out=Path(out), cfg=cfg, model=model)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(folder: Path) -> int | None:
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, out: Path | None) -> bool:
    """``exc`` (or one in its chain) is a full disk (see the module docstring)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in FULL_TEXTS):
            return True
    if out is not None and isinstance(exc, (OSError, RuntimeError)):
        free = free_bytes(out)
        return free is not None and free < NEARLY_FULL_BYTES
    return False


def _file_in(value, out: Path) -> Path | None:
    name = getattr(value, "name", value) if not isinstance(value, (str, os.PathLike)) else value
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return None
    path = Path(os.path.abspath(name))
    try:
        path.relative_to(out)
    except ValueError:
        return None
    return path if path != out and path.suffix else None


def written_file(exc: BaseException, out: Path) -> Path | None:
    """The innermost path under ``out`` that the failing stack was writing (None if none is seen)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.filename and _file_in(e.filename, out):
            return _file_in(e.filename, out)
    frames = []
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
    for frame in reversed(frames):  # innermost first
        for key in ("filename", "file", "path", "save_path", "f", "fp", "output_file"):
            if key in frame.f_locals:
                found = _file_in(frame.f_locals[key], out)
                if found is not None:
                    return found
    return None


def _describe(path: Path, out: Path) -> str:
    """``path`` relative to ``out``; a file in a checkpoint's staging folder is said to be one."""
    text = str(path.relative_to(out))
    return text + (" (a new checkpoint, written there before it is renamed into place)"
                   if re.search(r"(^|[/\\])\.staging-", text) else "")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _tokenizer_bytes(cfg) -> int:
    from ..assets import MODELS, is_pulled, model_dir

    name = cfg.model.name
    folder = model_dir(name) if name in MODELS and is_pulled(name) else Path(os.path.expanduser(name))
    return sum((folder / f).stat().st_size for f in TOKENIZER_FILES if (folder / f).is_file())


def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def needed_bytes(cfg, model, out: Path) -> tuple[int, str]:
    """(bytes the run needs free in ``out``, how that adds up) for its checkpoints and adapter."""
    adapter = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else 0
    tokenizer = _tokenizer_bytes(cfg)
    final = adapter + tokenizer
    last = latest_checkpoint(out)
    if last is not None:
        checkpoint, how = _size(last), f"a checkpoint takes {_gib(_size(last))} ({last.name})"
    else:
        state = 0 if cfg.train.optimizer == "sgd" else 2 * adapter  # AdamW: two fp32 moments per weight
        checkpoint = adapter + state + tokenizer + 64 * 1024
        how = (f"a checkpoint takes about {_gib(checkpoint)} (adapter {_gib(adapter)}, optimizer state "
               f"{_gib(state)}, tokenizer {_gib(tokenizer)})")
    copies = cfg.output.keep_checkpoints + 1 if cfg.train.save_steps else 1  # +1: the new one before pruning
    total = copies * checkpoint + final
    how += (f"; with output.keep_checkpoints {cfg.output.keep_checkpoints} up to {copies} at once"
            if cfg.train.save_steps else "; the interrupt checkpoint") + f", and the adapter {_gib(final)}"
    return total, how


def full_disk_error(exc: BaseException, out: Path, cfg, model=None) -> DiskFullError:
    """The :class:`DiskFullError` for a full disk met while the run wrote to ``out``."""
    path = written_file(exc, out)
    free = free_bytes(out)
    needed, how = needed_bytes(cfg, model, out)
    kept = latest_checkpoint(out)
    where = f"writing {_describe(path, out)} in {out}" if path is not None else f"writing to {out}"
    kept_text = (f"Kept: the last complete checkpoint {kept} (resume from it with resume=True / --resume once there "
                 "is room)" if kept is not None else
                 f"No complete checkpoint of this run is in {checkpoints_dir(out)}")
    adapter_text = ("; the adapter in {0} is not complete".format(out / "adapter")
                    if path is not None and "adapter" in path.relative_to(out).parts[:1] else
                    "; no adapter of this run was saved")
    message = (f"the disk is full (ENOSPC: No space left on device) {where}: "
               f"{_gib(free) if free is not None else 'no room'} free on that disk, and this run needs about "
               f"{_gib(needed)} there ({how}). {kept_text}{adapter_text}. Fix: free space on that disk, or set "
               "output.dir to a folder on a disk with room")
    return DiskFullError(message, path, kept)


def explains_full_disk(fn):
    """Decorator for ``finetune``: a full disk met while the run writes becomes a
    :class:`DiskFullError` with the message above (anything else passes through unchanged)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _RUN.clear()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            out = _RUN.get("out")
            if out is None or isinstance(e, DiskFullError) or not is_disk_full(e, out):
                raise
            error = full_disk_error(e, out, _RUN["cfg"], _RUN.get("model"))
            error.__cause__ = None
            raise error from None
        finally:
            _RUN.clear()

    return wrapper
