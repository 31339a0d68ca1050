"""The machine's RAM as a training process sees it: ``/proc/meminfo`` and the cgroup memory limit.

A notebook VM states its RAM in ``/proc/meminfo`` (MemTotal, MemAvailable); a container (Kaggle,
Docker, Kubernetes, many hosted notebooks) is held to its cgroup's limit, which ``/proc/meminfo``
does not show: cgroup v2 ``memory.max`` / ``memory.current`` / ``memory.stat``, cgroup v1
``memory.limit_in_bytes`` / ``memory.usage_in_bytes`` / ``memory.stat``. The out-of-memory killer
acts on whichever is smaller, so the budget is

    total     = min(MemTotal, cgroup limit)
    available = min(MemAvailable, cgroup limit - (cgroup usage - file cache))
    other     = total - available - the memory this process owns (RssAnon + RssShmem)

``other`` is what the OS and other processes hold (a notebook server, the platform's agents, other
kernels): the planner leaves it alone and counts this process itself through its own baseline term.
File pages are reclaimable: the cgroup's file cache (active and inactive: a checkpoint just read
sits in it) is not counted as used, and of this process only the memory it owns counts (VmRSS also
counts the file pages it maps, such as a memory-mapped checkpoint; the kernel drops them before it
kills). Pure Python (no torch); every reader takes its root so tests run on fixture files.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

GiB = 2**30
# cgroup v1 reports "no limit" as a page-rounded LONG_MAX; anything this large is no limit.
_UNLIMITED = 2**60


@dataclasses.dataclass(frozen=True)
class HostMemory:
    """RAM the training process may use (GiB): ``total_gib`` the ceiling, ``other_gib`` what is held
    outside this process, ``process_gib`` the memory this process owns when measured."""

    total_gib: float
    other_gib: float = 0.0
    process_gib: float | None = None
    source: str = ""

    @property
    def budget_gib(self) -> float:
        """What the training processes may hold: the total less what others hold."""
        return self.total_gib - self.other_gib


def read_meminfo(path="/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as {field: bytes} (the kB fields scaled; counts without a unit as they are)."""
    out: dict[str, int] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        out[name.strip()] = value * 1024 if len(parts) > 1 and parts[1].lower() == "kb" else value
    return out


def read_owned_memory(path="/proc/self/status") -> int | None:
    """The resident memory this process owns in bytes (RssAnon + RssShmem; VmRSS where a kernel
    does not split it), or None where it cannot be read."""
    try:
        status = read_meminfo(path)
    except OSError:
        return None
    if "RssAnon" in status:
        return status["RssAnon"] + status.get("RssShmem", 0)
    return status.get("VmRSS")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _file_cache(path: Path, v1: bool = False) -> int:
    """The file cache (active + inactive file pages) of a cgroup's ``memory.stat``, 0 where it
    cannot be read; v1 counts its subtree under the ``total_`` names where the kernel gives them."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    values = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    total = 0
    for name in ("inactive_file", "active_file"):
        total += values.get(f"total_{name}", values.get(name, 0)) if v1 else values.get(name, 0)
    return total


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> tuple[list[Path], list[Path]]:
    """Candidate (v2, v1) memory-controller folders for this process, innermost first: the path
    ``/proc/self/cgroup`` names under the mount, then the mount itself (a container sees its own
    cgroup at the mount's root)."""
    v2_rel, v1_rel = None, None
    try:
        for line in proc_cgroup.read_text(encoding="utf-8").splitlines():
            hier, _, rest = line.partition(":")
            controllers, _, rel = rest.partition(":")
            if hier == "0" and controllers == "":
                v2_rel = rel
            elif "memory" in controllers.split(","):
                v1_rel = rel
    except OSError:
        pass

    def chain(base: Path, rel: str | None) -> list[Path]:
        dirs = []
        if rel and rel.strip("/"):
            dirs.append(base / rel.strip("/"))
        dirs.append(base)
        return dirs

    return chain(root, v2_rel), chain(root / "memory", v1_rel)


def read_cgroup_memory(root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup") -> tuple[int | None, int | None]:
    """(limit, used) bytes of this process's memory cgroup, v2 first, then v1; (None, None) where
    there is no limit. ``used`` leaves out the file cache (reclaimable)."""
    root, proc_cgroup = Path(root), Path(proc_cgroup)
    v2_dirs, v1_dirs = _cgroup_dirs(root, proc_cgroup)
    for d in v2_dirs:
        if (d / "memory.max").is_file():
            limit = _read_int(d / "memory.max")
            if limit is None:
                continue
            current = _read_int(d / "memory.current")
            cache = _file_cache(d / "memory.stat")
            used = None if current is None else max(0, current - cache)
            return limit, used
    for d in v1_dirs:
        if (d / "memory.limit_in_bytes").is_file():
            limit = _read_int(d / "memory.limit_in_bytes")
            if limit is None:
                continue
            usage = _read_int(d / "memory.usage_in_bytes")
            cache = _file_cache(d / "memory.stat", v1=True)
            used = None if usage is None else max(0, usage - cache)
            return limit, used
    return None, None


def detect_host(meminfo="/proc/meminfo", cgroup_root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup",
                status="/proc/self/status") -> HostMemory | None:
    """The RAM this process may use, from /proc and the cgroup (see the module docstring); None
    where ``/proc/meminfo`` cannot be read (not Linux)."""
    try:
        info = read_meminfo(meminfo)
    except OSError:
        return None
    total = info.get("MemTotal")
    if not total:
        return None
    available = info.get("MemAvailable", info.get("MemFree", total))
    where = "/proc/meminfo"
    limit, used = read_cgroup_memory(cgroup_root, proc_cgroup)
    if limit is not None and limit < total:
        total = limit
        where = "cgroup memory limit"
    if limit is not None:
        cg_available = limit - used if used is not None else limit
        available = min(available, max(0, cg_available))
    available = min(available, total)
    owned = read_owned_memory(status)
    other = max(0, total - available - (owned or 0))
    return HostMemory(total_gib=round(total / GiB, 3), other_gib=round(other / GiB, 3),
                      process_gib=None if owned is None else round(owned / GiB, 3),
                      source=f"measured here ({where}: {total / GiB:.2f} GiB, {available / GiB:.2f} GiB available)")
