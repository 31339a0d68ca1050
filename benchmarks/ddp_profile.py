"""Where one micro-batch of ``nbtune finetune`` spends its time, on one GPU or on each DDP rank.

    python benchmarks/ddp_profile.py run.yaml --out DIR [--skip 10] [--active 4]
    torchrun --nproc_per_node 2 benchmarks/ddp_profile.py run.yaml --out DIR [...]

Runs the CLI's ``finetune`` on the config unchanged, with the trainer's ``training_step`` wrapped:
micro-batches ``skip+1 .. skip+active`` of every rank run under torch.profiler (CPU and CUDA), with
one device synchronization before and after the window so its wall time is exact, and under
torch's CUDA sync-debug mode, which names each Python line that synchronizes. Per rank it writes
``DIR/profile-<world>gpu-rank<r>.txt``:

- wall time per micro-batch in the window, and the GPU's busy time in it (the union of kernel
  intervals: wall minus busy is time the GPU waited on the host, on a peer rank or on a copy);
- the CUDA runtime calls that block the host (stream/event/device synchronize, blocking copies),
  with count and time, and the Python lines that synchronized (paths relative to the repository,
  or to the folder an installed package lives in: ``relpaths.py``);
- the top CUDA kernels by total time (NCCL's all-reduces among them under DDP) and the top CPU
  ops by self time;
- the loop's phases per optimizer step, host time (fetching the step's batches, clipping, the
  callbacks' events, the optimizer step and scheduler+zero_grad between them, logging), and the
  garbage collections, before training and during it;
- the host timeline of every training_step call and of the gap before it: under asynchronous
  execution a call that returns fast only queued its kernels, a long call or gap waited on the
  GPU (a synchronization), on another rank or on host work.

- on CUDA, per call, a timed event at its start and end put on the host clock: the GPU's span for
  the call and its *lag*, how long after the host returned the GPU finished the call's work (a
  steady lag of tens of ms: the GPU is the bottleneck and the host runs ahead; ~0: the GPU waited
  on the host); and per optimizer step the host's and the GPU's time and the mean lag.

The one-GPU run of the same config and micro-batch shape is the baseline: whatever a DDP rank
spends beyond it per micro-batch is the cost of data parallelism.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # imported from elsewhere (the tests)
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from relpaths import short_path  # noqa: E402

BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds)."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(prof, wall_s: float, micro_batches: int, sync_lines: collections.Counter, rank: int, world: int,
              top: int = 20) -> str:
    events = prof.events()
    # device-side events that are kernels or copies (not the GPU ranges of annotations such as DDP's forward)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)
               and not e.name.startswith(("nccl:", "DistributedDataParallel"))]
    busy_s = _busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6
    lines = [f"# rank {rank} of {world}: {micro_batches} micro-batches, wall {wall_s:.3f} s "
             f"({wall_s / micro_batches * 1e3:.1f} ms each), GPU busy {busy_s:.3f} s "
             f"({busy_s / wall_s:.1%}; idle {(wall_s - busy_s) / micro_batches * 1e3:.1f} ms per micro-batch)"]
    runtime = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda"):
            runtime[e.name][0] += 1
            runtime[e.name][1] += e.time_range.elapsed_us()
    lines.append("\n## CUDA runtime calls (count, total ms, per micro-batch)")
    for name, (n, us) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:top]:
        mark = "  <- blocks the host" if name.startswith(BLOCKING_CALLS) else ""
        lines.append(f"{name:<40} {n:>7} {us / 1e3:>10.2f} ms {n / micro_batches:>8.1f}{mark}")
    lines.append("\n## Python lines that synchronized (sync-debug mode)")
    lines += [f"{n:>5}  {where}" for where, n in sync_lines.most_common(top)] or ["(none)"]
    by_kernel = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_kernel[e.name][0] += 1
        by_kernel[e.name][1] += e.time_range.elapsed_us()
    lines.append("\n## top CUDA kernels (count, total ms, share of busy)")
    for name, (n, us) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{name[:90]:<90} {n:>6} {us / 1e3:>9.2f} ms {us / 1e6 / max(busy_s, 1e-9):>6.1%}")
    nccl = sum(us for name, (n, us) in by_kernel.items() if "nccl" in name.lower())
    lines.append(f"NCCL kernels: {nccl / 1e3:.2f} ms in all")
    lines.append("\n## top CPU ops by self time")
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    return "\n".join(lines)


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class MicroBatchProfiler:
    """Wraps a trainer class's ``training_step``: profiles micro-batches skip+1 .. skip+active."""

    def __init__(self, out: str, skip: int, active: int):
        self.out, self.skip, self.active = out, skip, active
        self.calls = 0
        self.prof = None
        self.text = "# the window was not reached"
        self.marks: list[tuple[float, float]] = []  # (start, end) host time of every training_step call
        self.gpu_marks: list[list] = []  # (start, end) CUDA events of every call, on the current stream
        self.gpu_ref = None  # (host time, CUDA event) recorded together, the queue empty: the clocks' offset
        self.call_steps: list[int] = []  # the trainer's global step at every call
        self.t0 = 0.0
        self.sync_lines: collections.Counter = collections.Counter()
        self._warnings = None
        self.replaced: list = []  # (owner, name, what its class dict held) to restore
        self.events: list[tuple[int, str, float, float]] = []  # (step, phase, start, end)
        self.gc: dict[tuple[str, int], tuple[int, float]] = {}
        self.step = 0

    def _gpu_mark(self):
        """A timed CUDA event on the current stream, or None without CUDA."""
        if not torch.cuda.is_available():
            return None
        if self.gpu_ref is None:
            _synchronize()
            ref = torch.cuda.Event(enable_timing=True)
            ref.record()
            self.gpu_ref = (time.perf_counter(), ref)
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def before(self):
        self.call_steps.append(self.step)
        self.marks.append((time.perf_counter(), 0.0))
        self.gpu_marks.append([self._gpu_mark(), None])
        if self.calls == self.skip:
            _synchronize()
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def after(self):
        self.marks[-1] = (self.marks[-1][0], time.perf_counter())
        self.gpu_marks[-1][1] = self._gpu_mark()
        self.calls += 1
        if self.prof is not None and self.calls == self.skip + self.active:
            _synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode(0)
            self.record_sync_lines(self._caught)
            self._warnings.__exit__(None, None, None)
            self.text = summarize(self.prof, wall, self.active, self.sync_lines, *_rank_world())
            print(self.text.split("\n", 1)[0], file=sys.stderr, flush=True)
            self.prof = None
            self.write()  # now too: a run killed later (a time limit) still leaves the figures

    def record_sync_lines(self, caught) -> None:
        """Count the Python lines that synchronized (sync-debug warnings), as repo-relative paths."""
        self.sync_lines.update(f"{short_path(w.filename)}:{w.lineno}" for w in caught
                               if "synchroniz" in str(w.message))

    def write(self):
        """The window's summary, the timeline of every call and the loop's phases: one file per rank."""
        rank, world = _rank_world()
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"profile-{world}gpu-rank{rank}.txt"), "w") as f:
            gpu = self.gpu_times()  # one read of the events for both tables
            f.write("\n\n".join([self.text, self.phases(), self.steps(gpu), self.timeline(gpu)]) + "\n")

    def timeline(self, gpu: list | None = None) -> str:
        """Host time in each training_step call and in the gap before it (optimizer step, logging, data):
        under asynchronous execution a call that returns fast queued its kernels; a long gap or call
        waited on the GPU (a synchronization) or on host work."""
        rows = ["## host timeline (ms): call, gap before it (up to the window's end); on the GPU: the span from "
                "reaching the call's first work to finishing its last, and the lag, how long after the host "
                "returned from the call the GPU finished its work (~0: the GPU kept up with the host, which was "
                "the bottleneck; large: the host ran ahead of a busy GPU)"]
        gpu = self.gpu_times() if gpu is None else gpu
        prev_end = None
        for i, (start, end) in enumerate(self.marks):
            gap = (start - prev_end) * 1e3 if prev_end is not None else float("nan")
            on_gpu = ""
            if gpu[i] is not None:
                g0, g1 = gpu[i]
                on_gpu = f"  gpu span {(g1 - g0) * 1e3:>8.1f}  lag {(g1 - end) * 1e3:>8.1f}"
            rows.append(f"{i:>4} call {(end - start) * 1e3:>8.1f}  gap {gap:>8.1f}{on_gpu}"
                        + ("   <- profiled" if self.skip <= i < self.skip + self.active else ""))
            prev_end = end
        return "\n".join(rows)

    def steps(self, gpu: list | None = None) -> str:
        """Per optimizer step, from its first call to the next step's first call: the host's time
        and the GPU's (reaching the first call's work to reaching the next step's), the mean lag at
        the end of its calls; a step that holds profiled calls is marked."""
        rows = ["## optimizer steps (ms): host and GPU time from the step's first call to the next step's, "
                "mean lag at its calls' ends"]
        gpu = self.gpu_times() if gpu is None else gpu
        firsts = [i for i, step in enumerate(self.call_steps) if i == 0 or step != self.call_steps[i - 1]]
        for a, b in zip(firsts, firsts[1:]):
            host = (self.marks[b][0] - self.marks[a][0]) * 1e3
            row = f"step {self.call_steps[a]:>3}: {b - a} calls, host {host:>8.1f}"
            if gpu[a] is not None and gpu[b] is not None:
                lags = [(gpu[i][1] - self.marks[i][1]) * 1e3 for i in range(a, b) if gpu[i] is not None]
                row += f"  gpu {(gpu[b][0] - gpu[a][0]) * 1e3:>8.1f}  lag {sum(lags) / len(lags):>6.1f}"
            if any(self.skip <= i < self.skip + self.active for i in range(a, b)):
                row += "   (holds profiled calls)"
            rows.append(row)
        return "\n".join(rows)

    def gpu_times(self) -> list:
        """Per call, the host-clock times at which the GPU reached its start and end events (None
        where not recorded): the reference event was recorded on an empty queue at a known host time."""
        if self.gpu_ref is None:
            return [None] * len(self.marks)
        _synchronize()
        t_ref, ref = self.gpu_ref
        return [(t_ref + ref.elapsed_time(a) / 1e3, t_ref + ref.elapsed_time(b) / 1e3) if a is not None and b is not None
                else None for a, b in self.gpu_marks]

    def phases(self) -> str:
        """Host time of each phase of the loop (fetching the step's batches, clipping, the callbacks'
        events, logging) per step: where the time between two steps' micro-batches goes."""
        rows = ["## loop phases (ms of host time; step = the trainer's global step when it began)"]
        per = collections.defaultdict(lambda: collections.defaultdict(float))
        last_end: dict[str, float] = {}
        for step, name, t0, t1 in self.events:
            per[step][name] += (t1 - t0) * 1e3
            # the untimed spans between the callbacks' events: the optimizer's step, then the
            # learning-rate scheduler and zero_grad
            for span, after, before in (("optimizer.step", "on_pre_optimizer_step", "on_optimizer_step"),
                                        ("scheduler+zero_grad", "on_optimizer_step", "on_step_end")):
                if name == before and after in last_end:
                    per[step][span] += (t0 - last_end.pop(after)) * 1e3
            last_end[name] = t1
        for step in sorted(per):
            rows.append(f"step {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in per[step].items() if v >= 0.5))
        gc_rows = ", ".join(f"{when} gen{g}: {n} collections {t * 1e3:.1f} ms"
                            for (when, g), (n, t) in sorted(self.gc.items()))
        rows.append(f"## garbage collector over the run: {gc_rows or 'none'}")
        return "\n".join(rows)

    def _gc_callback(self, phase, info):
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:  # keyed by when: before the first micro-batch (loading) or from it on (training)
            key = ("training" if self.marks else "loading", info["generation"])
            n, t = self.gc.get(key, (0, 0.0))
            self.gc[key] = (n + 1, t + time.perf_counter() - self._gc_t0)

    def time_method(self, owner, name: str, key=None):
        """Record the host time of every call of ``owner.name`` (with the trainer's global step), under
        its name or ``key(args)``."""
        original = getattr(owner, name)
        self.replaced.append((owner, name, vars(owner).get(name)))
        hook = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                hook.events.append((hook.step, key(args) if key else name, t0, time.perf_counter()))

        setattr(owner, name, timed)

    def install(self, cls):
        import gc

        from transformers import trainer_callback

        gc.callbacks.append(self._gc_callback)
        for name in ("get_batch_samples", "_clip_grad_norm", "_maybe_log_save_evaluate"):
            if hasattr(cls, name):
                self.time_method(cls, name)
        self.time_method(trainer_callback.CallbackHandler, "call_event", key=lambda args: args[1])
        original = cls.training_step
        self.replaced.append((cls, "training_step", vars(cls).get("training_step")))
        hook = self

        def training_step(self, *args, **kwargs):
            hook.step = self.state.global_step
            hook.before()
            try:
                return original(self, *args, **kwargs)
            finally:
                hook.after()

        cls.training_step = training_step

    def uninstall(self):
        """The wrapped methods back as they were, the collector's callback removed."""
        import gc

        for owner, name, held in reversed(self.replaced):
            if held is None:
                delattr(owner, name)  # it was inherited: the base class's shows through again
            else:
                setattr(owner, name, held)
        self.replaced = []
        if self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", type=int, default=10, help="micro-batches run before the window (compile, first steps)")
    ap.add_argument("--active", type=int, default=4, help="micro-batches profiled")
    a = ap.parse_args(argv)
    import transformers

    # the SFT trainer's own training_step calls the base class's: wrap the outermost one only
    try:
        import trl

        cls = trl.SFTTrainer if "training_step" in vars(trl.SFTTrainer) else transformers.Trainer
    except ImportError:
        cls = transformers.Trainer
    profiler = MicroBatchProfiler(a.out, a.skip, a.active)
    profiler.install(cls)
    from nbtune.ui.cli import main as cli

    try:
        return cli(["finetune", a.config])
    finally:
        profiler.write()
        profiler.uninstall()


if __name__ == "__main__":
    sys.exit(main())
