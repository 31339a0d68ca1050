"""What the GPUs did during a benchmark run, sampled from outside: SM clock, power, temperature,
utilization and the driver's clock-event reasons (why a clock is held down), every ``interval_ms``,
by ``nvidia-smi --query-gpu ... --loop-ms``.

It answers questions the run's own timings cannot: did one GPU of a data-parallel pair run at a
lower clock than the other (the slower rank sets the pace of every step), did a run hit the power
cap, did a GPU sit idle. :func:`summarize` reduces the samples per GPU to what a results file
keeps; only the *busy* samples (utilization >= ``BUSY_UTIL``) count for the clock and power
figures, so loading and start-up do not dilute them.

    with GpuSampler(path) as s: ...run...
    s.summary()  # {gpu index: {...}} or {} where nvidia-smi is missing
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import time

BUSY_UTIL = 50  # % utilization from which a sample counts as the GPU training
FIELDS = ("index", "clocks.sm", "power.draw", "temperature.gpu", "utilization.gpu", "clocks_event_reasons.active")
# the driver's clock-event reason bits (nvidia-smi -q documents them; 0x1, idle, is not a slowdown)
REASONS = {0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x10: "sync_boost",
           0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake", 0x100: "display_clocks"}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse(lines) -> list[dict]:
    """nvidia-smi's csv,noheader,nounits lines (FIELDS in order) as dicts; malformed lines are dropped."""
    out = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(FIELDS) or not parts[0].isdigit():
            continue
        reasons = parts[-1]
        try:
            mask = int(reasons, 16) if reasons.lower().startswith("0x") else None
        except ValueError:
            mask = None
        out.append(dict(gpu=int(parts[0]), sm_mhz=_number(parts[1]), power_w=_number(parts[2]),
                        temp_c=_number(parts[3]), util=_number(parts[4]), reasons=mask))
    return out


def reason_names(mask: int) -> list[str]:
    return [name for bit, name in REASONS.items() if mask & bit]


def summarize(samples: list[dict], interval_ms: int) -> dict:
    """Per GPU: how long it was busy, its SM clock (median, lowest) and power (median, highest)
    while busy, its peak temperature, and every slowdown reason seen while busy with the share of
    busy samples that carried it."""
    out = {}
    for gpu in sorted({s["gpu"] for s in samples}):
        mine = [s for s in samples if s["gpu"] == gpu]
        busy = [s for s in mine if s["util"] is not None and s["util"] >= BUSY_UTIL]
        clocks = [s["sm_mhz"] for s in busy if s["sm_mhz"] is not None]
        power = [s["power_w"] for s in busy if s["power_w"] is not None]
        temps = [s["temp_c"] for s in mine if s["temp_c"] is not None]
        seen: dict[str, int] = {}
        for s in busy:
            for name in reason_names(s["reasons"] or 0):
                seen[name] = seen.get(name, 0) + 1
        out[gpu] = dict(samples=len(mine), busy_s=round(len(busy) * interval_ms / 1000, 1),
                        util_mean_busy=round(statistics.mean(s["util"] for s in busy), 1) if busy else None,
                        sm_mhz_median=statistics.median(clocks) if clocks else None,
                        sm_mhz_min=min(clocks) if clocks else None,
                        power_w_median=round(statistics.median(power), 1) if power else None,
                        power_w_max=max(power) if power else None, temp_c_max=max(temps) if temps else None,
                        slowdowns={k: round(v / len(busy), 3) for k, v in sorted(seen.items())})
    return out


class GpuSampler:
    """Samples every GPU with nvidia-smi into ``path`` between ``start()`` and ``stop()``; a no-op
    where nvidia-smi is missing or refuses the query."""

    def __init__(self, path: str, interval_ms: int = 200):
        self.path, self.interval_ms = path, interval_ms
        self.proc: subprocess.Popen | None = None
        self._file = None

    def start(self) -> "GpuSampler":
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        self._file = open(self.path, "w")
        self.proc = subprocess.Popen([exe, f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits",
                                      f"--loop-ms={self.interval_ms}"], stdout=self._file, stderr=subprocess.DEVNULL)
        time.sleep(0.05)
        if self.proc.poll() not in (None, 0):  # a driver that does not know a field: no samples
            self.proc = None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._file is not None:
            self._file.close()
            self._file = None

    def samples(self) -> list[dict]:
        try:
            with open(self.path) as f:
                return parse(f)
        except OSError:
            return []

    def summary(self) -> dict:
        return summarize(self.samples(), self.interval_ms)

    def __enter__(self) -> "GpuSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
