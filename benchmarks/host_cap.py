"""Run a command with its host RAM capped, as on free Colab (12.7 GB for the whole machine).

    python benchmarks/host_cap.py --cap-gb 12.7 -- python -c "..."     # prints one JSON line at the end

The cap is a memory cgroup made for the command and removed after it: cgroup v2 ``memory.max``
(with ``memory.swap.max`` 0) or v1 ``memory.limit_in_bytes`` (with ``memory.memsw.limit_in_bytes``
where swap accounting exists). Going over it gets the command OOM-killed, as the Colab VM would,
so a run that finishes held the cap. Page cache counts against a cgroup but is reclaimed under it,
so writing files larger than the cap is fine; anonymous memory is what cannot exceed it.

Where no cgroup can be made (not root, no memory controller) the command runs uncapped and the
result says so (``capped: false``); its peak RSS is still measured and compared with the cap.

Peak RSS is the largest resident set of the command or any of its children (``wait4``'s
``ru_maxrss``), which is what the process costs the host, imports and CUDA libraries included. The
kernel counts a forked child's pages from before its ``exec`` too, so a command forked straight
from a large process (a test runner, a driver that loaded a model) would be charged that
process's size: the command is started by a small launcher (:func:`measured`) whose own
interpreter, a few MB, is the most it can be overcharged.

:class:`CappedChild` is the one place that starts a command this way; :func:`run_capped` here and
benchmarks/models.py's peer runs both use it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 10 ** 9
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
        return True
    except OSError:
        return False


def make_cgroup(cap_bytes: int, name: str) -> tuple[Path, str] | None:
    """A fresh memory cgroup limited to ``cap_bytes`` (``(dir, "v2"|"v1")``), or None where none can be made."""
    v2 = CGROUP_ROOT / "cgroup.controllers"
    candidates = []
    if v2.is_file() and "memory" in v2.read_text().split():
        candidates.append((CGROUP_ROOT / name, "v2"))
    if (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").is_file():
        candidates.append((CGROUP_ROOT / "memory" / name, "v1"))
    for folder, kind in candidates:
        try:
            folder.mkdir()
        except OSError:
            continue
        if kind == "v2":
            ok = _write(folder / "memory.max", str(cap_bytes))
            if (folder / "memory.swap.max").exists():
                _write(folder / "memory.swap.max", "0")
        else:
            ok = _write(folder / "memory.limit_in_bytes", str(cap_bytes))
            if (folder / "memory.memsw.limit_in_bytes").exists():
                _write(folder / "memory.memsw.limit_in_bytes", str(cap_bytes))
        if ok:
            return folder, kind
        remove_cgroup(folder)
    return None


def remove_cgroup(folder: Path) -> None:
    for _ in range(50):  # the kernel frees the group once its last task has exited
        try:
            folder.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def oom_kills(folder: Path, kind: str) -> int:
    """OOM kills inside the group (v2 memory.events' oom_kill; v1: the failure counter's OOM flag)."""
    try:
        if kind == "v2":
            for line in (folder / "memory.events").read_text().splitlines():
                key, value = line.split()
                if key == "oom_kill":
                    return int(value)
        else:
            for line in (folder / "memory.oom_control").read_text().splitlines():
                key, value = line.split()
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


LAUNCHER = """
import os, sys
path, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(path, "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def measured(cmd: list[str]) -> tuple[list[str], str]:
    """(argv that runs ``cmd`` through the launcher, file the launcher writes the peak RSS in kB to).
    A command killed by signal N exits 128 + N."""
    fd, path = tempfile.mkstemp(prefix="nbtune-peak-")
    os.close(fd)
    return [sys.executable, "-c", LAUNCHER, path, *cmd], path


def read_peak(path: str) -> int | None:
    """Bytes of the peak RSS the launcher wrote (None if it did not get that far); removes the file."""
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) * 1024 if text else None
    except (OSError, ValueError):
        return None
    finally:
        if os.path.exists(path):
            os.remove(path)


class CappedChild:
    """``cmd`` started under a host-RAM cap of ``cap_gb`` GB: in a fresh memory cgroup where one can be
    made (else uncapped), through the launcher so its peak RSS is its own. ``setup`` runs in the child
    before it enters the cgroup; ``popen`` goes to :class:`subprocess.Popen`. The caller waits on
    ``proc``; :meth:`finish` (also on leaving a ``with``) then reads ``oom_kills`` and ``peak_bytes``
    (None if the launcher wrote none) and removes the cgroup."""

    def __init__(self, cmd: list[str], cap_gb: float, setup=None, **popen):
        self.cap_gb = cap_gb
        self.group = make_cgroup(int(cap_gb * GB), f"nbtune-cap-{os.getpid()}-{time.monotonic_ns()}")
        self.oom_kills = 0
        self.peak_bytes: int | None = None
        argv, self._peak_file = measured(cmd)
        group = self.group

        def start():  # in the child, before the launcher runs
            if setup is not None:
                setup()
            if group:
                (group[0] / "cgroup.procs").write_text(str(os.getpid()))

        try:
            self.proc = subprocess.Popen(argv, preexec_fn=start, **popen)
        except BaseException:
            self.finish()
            raise

    @property
    def capped(self) -> bool:
        return bool(self.group)

    @property
    def cgroup(self) -> str | None:
        """The cgroup version, "v2" or "v1"; None where no cgroup could be made."""
        return self.group[1] if self.group else None

    def finish(self) -> None:
        """Read the OOM kills and the peak RSS, remove the cgroup and the peak file (once)."""
        if self._peak_file is None:
            return
        if self.group:
            self.oom_kills = oom_kills(*self.group)
            remove_cgroup(self.group[0])
        self.peak_bytes = read_peak(self._peak_file)
        self._peak_file = None

    def __enter__(self) -> "CappedChild":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def run_capped(cmd: list[str], cap_gb: float, env: dict | None = None, log=None) -> dict:
    """Run ``cmd`` under the cap; returns exit code, capped or not, peak RSS (GB and GiB), OOM kills, seconds."""
    cap = int(cap_gb * GB)
    t0 = time.monotonic()
    with CappedChild(cmd, cap_gb, env=env, stdout=log, stderr=subprocess.STDOUT if log else None) as child:
        try:
            child.proc.wait()
        except KeyboardInterrupt:
            child.proc.send_signal(signal.SIGINT)
            raise
        seconds = time.monotonic() - t0
    rc, peak = child.proc.returncode, child.peak_bytes or 0
    return {"cmd": cmd[-1][:200] if len(cmd) > 2 else " ".join(cmd), "returncode": rc,
            "capped": child.capped, "cgroup": child.cgroup, "cap_gb": cap_gb,
            "peak_rss_gb": round(peak / GB, 3), "peak_rss_gib": round(peak / 2 ** 30, 3),
            "under_cap": peak <= cap and rc == 0, "oom_kills": child.oom_kills, "seconds": round(seconds, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap-gb", type=float, default=12.7, help="host RAM cap in GB (10^9 bytes; Colab states 12.7 GB)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    result = run_capped(cmd, args.cap_gb)
    print(json.dumps(result))
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
