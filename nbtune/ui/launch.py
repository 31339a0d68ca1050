"""Data-parallel runs from a notebook: ``%%finetune --gpus N`` and ``nbtune.finetune(cfg, gpus=N)``.

The processes are started by accelerate's ``notebook_launcher`` (torch elastic, fork start
method), each one running :func:`nbtune.train.finetune` on its own GPU as under torchrun (see
:mod:`nbtune.train.distributed`). Forking the kernel has rules, which accelerate enforces and which
are checked here first with an error that says what to do:

- CUDA must not be initialised in the kernel (a forked child cannot use the parent's CUDA);
- bitsandbytes must not be imported in the kernel (accelerate refuses: it may initialise CUDA);
  transformers' Trainer, peft and TRL import it, so the kernel side of a launch never imports
  them: this module needs only the config schema, torch (``device_count`` reads NVML and leaves
  CUDA alone) and accelerate's launcher;
- no accelerate ``Accelerator`` / ``AcceleratorState`` in the kernel.

How rank 0's metrics reach the notebook: the kernel makes a fresh folder and an empty feed file
in it; rank 0 gets a listener that appends every metrics record to the feed (one JSON line,
flushed). The launcher runs in a background thread; the kernel's main thread reads new lines from
the feed into the dashboard (and any other listener) every ``poll_s`` seconds until the ranks are
done. Rank 0 then writes its result (paths, losses, steps) into the folder, and every rank that
fails writes its error there, so the kernel can raise the error itself (a config or data problem
as such, not as "a child process failed").

Interrupting: the rank processes leave the kernel's process group (so a terminal's Ctrl-C or the
notebook's interrupt reaches only the kernel); the kernel then drops a ``stop`` file into the
folder, rank 0's listener turns it into its own SIGINT at the next logging step and the ranks stop
together after that step with a checkpoint (``--resume`` continues). A second interrupt aborts.

``plan``/``dry_run`` with ``gpus=N`` run in a fresh (spawned) process, because they import the
training stack, and a kernel that has imported it can no longer launch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from ..train.config import ConfigError, build_config
from ..train.outcome import RunOutcome
from .fixable import is_fixable

FEED = "metrics.jsonl"
RESULT = "result.json"
STOP, ABORT = "stop", "abort"


class LaunchError(RuntimeError):
    """A data-parallel launch that cannot start, or whose ranks failed; ``fixable`` when the cause
    is the config, the data or the model (the message alone says what to change)."""

    def __init__(self, message: str, fixable: bool = False):
        super().__init__(message)
        self.fixable = fixable


# ---------------------------------------------------------------------------- checks in the kernel
def _shown(flag: str, processes) -> str:
    """The option as the caller spelled it: "gpus=2" (Python) or "--gpus 2" (the magic)."""
    return f"{flag}{'' if flag.endswith('=') else ' '}{processes}"


def check_launch(processes, flag: str = "gpus=", device: str = "cuda") -> None:
    """Raise :class:`LaunchError` unless ``processes`` ranks can be forked from this process onto
    ``device`` ("cuda": one GPU each; "cpu": gloo processes, for tests and CPU-only machines).
    ``flag`` is how the caller spelled the option (``--gpus`` in the magic), for the message."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise LaunchError(f"{_shown(flag, repr(processes))}: give a whole number of GPUs, at least 1", fixable=True)
    shown = _shown(flag, processes)
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()  # NVML: does not initialise CUDA
        if processes > count:
            if count == 0:
                raise LaunchError(f"{shown}: there is no CUDA GPU here (torch.cuda.device_count() = 0)", fixable=True)
            raise LaunchError(f"{shown}: this machine has {count} GPU(s) (torch.cuda.device_count() = {count}); "
                              f"ask for at most {count}", fixable=True)
    elif device != "cpu":
        raise LaunchError(f"device must be 'cuda' or 'cpu', not {device!r}")
    if processes == 1:
        return  # one process runs in the kernel: nothing is forked
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise LaunchError(
            f"{shown}: CUDA is already initialised in this kernel (an earlier cell loaded a model or put a tensor "
            "on the GPU), and the processes of a multi-GPU run are forked from the kernel, which CUDA does not "
            "survive. Restart the kernel and run this cell before anything touches the GPU.")
    if "bitsandbytes" in sys.modules:
        raise LaunchError(
            f"{shown}: bitsandbytes is already imported in this kernel (an earlier single-GPU run, or an import "
            "of peft / trl / bitsandbytes), and accelerate's notebook_launcher refuses to fork the kernel then. "
            "Restart the kernel and run this cell first (--plan and --dry-run with --gpus keep the kernel clean).")
    state = sys.modules.get("accelerate.state")
    if state is not None and len(state.AcceleratorState._shared_state) > 0:
        raise LaunchError(f"{shown}: an accelerate Accelerator already exists in this kernel; accelerate's "
                          "notebook_launcher needs a kernel without one. Restart the kernel.")


# ---------------------------------------------------------------------------- inside each rank
class FeedWriter:
    """Rank 0's metrics listener: appends each record to the feed file the kernel reads, and turns
    the kernel's ``stop`` / ``abort`` files into this process's own SIGINT (first: stop after this
    step with a checkpoint; second: abort)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / FEED
        self.signalled = 0

    def __call__(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        wanted = 2 if (self.folder / ABORT).exists() else 1 if (self.folder / STOP).exists() else 0
        if wanted > self.signalled:
            self.signalled += 1
            os.kill(os.getpid(), signal.SIGINT)


def _result_fields(result) -> dict:
    """Rank 0's result as JSON values: every field of :class:`LaunchResult` the kernel does not make
    itself (paths as text)."""
    fields = {}
    for f in _sent_fields():
        value = getattr(result, f.name, None)
        fields[f.name] = str(value) if isinstance(value, Path) else value
    return fields


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _detach_from_kernel(kernel_pid: int) -> None:
    """In a rank process: leave the kernel's process group (interrupts come through the stop file)
    and die with the launcher (Linux), so a restarted kernel leaves no rank behind."""
    if os.getpid() == kernel_pid:  # not forked: never touch the kernel's own session
        return
    with contextlib.suppress(OSError):
        os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def rank_main(config: dict, options: dict, folder: str, kernel_pid: int) -> None:
    """What each forked process runs: :func:`nbtune.train.finetune` as one rank of the run."""
    _detach_from_kernel(kernel_pid)
    from ..train.distributed import rank

    me, where = rank(), Path(folder)
    try:
        from ..train import finetune

        listeners = [FeedWriter(where)] if me == 0 else []
        result = finetune(config, listeners=listeners, progress=False, reuse_model=False, **options)
        if me == 0:
            _write_json(where / RESULT, _result_fields(result))
    except BaseException as e:
        _write_json(where / f"error-rank{me}.json", dict(rank=me, type=type(e).__name__, message=str(e),
                                                         fixable=is_fixable(e), traceback=traceback.format_exc()))
        raise


# ---------------------------------------------------------------------------- the kernel side
@dataclasses.dataclass
class LaunchResult(RunOutcome):
    """A data-parallel run seen from the notebook: rank 0's paths, losses and metrics. The model
    lives in the (finished) rank processes; :meth:`load` brings the trained adapter into this
    kernel (after which another ``--gpus`` run needs a restarted kernel: it imports the training
    stack)."""

    interrupted: bool
    checkpoint: Path | None
    resumed_from: int | None
    merged_dir: Path | None
    world_size: int
    global_batch: int
    replicas_identical: bool | None
    gradient_checkpointing: str | None = None  # the mode rank 0 used ("auto" resolved)
    checkpointing_reason: str | None = None
    rows_truncated: int = 0
    packing: dict | None = None
    metrics: list = dataclasses.field(repr=False, default_factory=list)
    dashboard: object = dataclasses.field(repr=False, default=None)
    _loaded: object = dataclasses.field(repr=False, default=None)

    def load(self):
        """A :class:`~nbtune.train.run.FinetuneResult` in this kernel for the trained adapter (its
        ``chat()``, ``generate()``, ``save_merged()`` load the base model and the adapter here):
        every field the two have in common, copied."""
        if self._loaded is None:
            from ..train.run import FinetuneResult

            mine = {f.name for f in dataclasses.fields(self)}
            shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(FinetuneResult)
                      if f.init and f.name in mine and not f.name.startswith("_")}
            self._loaded = FinetuneResult(**shared, _generation=-1)
        return self._loaded

    def chat(self, *args, **kwargs):
        return self.load().chat(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.load().generate(*args, **kwargs)

    def save_merged(self, *args, **kwargs):
        self.merged_dir = self.load().save_merged(*args, **kwargs)
        return self.merged_dir


# LaunchResult's fields that the kernel side fills in itself; rank 0 sends all the others.
_KERNEL_SIDE = ("config", "metrics", "dashboard", "_loaded")


def _sent_fields() -> list:
    return [f for f in dataclasses.fields(LaunchResult) if f.name not in _KERNEL_SIDE]


def _launch_result(cfg, fields: dict, metrics: list) -> LaunchResult:
    """The kernel's :class:`LaunchResult` from rank 0's JSON fields (paths back to ``Path``)."""
    values = {}
    for f in _sent_fields():
        value = fields.get(f.name)
        values[f.name] = Path(value) if value is not None and "Path" in str(f.type) else value
    return LaunchResult(config=cfg, metrics=metrics, **values)


class _FeedReader:
    """Reads the complete lines appended to the feed since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()  # an unfinished last line waits for the next call
        return [json.loads(line) for line in lines if line.strip()]


def _free_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@contextlib.contextmanager
def _environment(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _feed(listeners, records, on_interrupt) -> None:
    for rec in records:
        for listener in list(listeners):
            try:
                listener(rec)
            except KeyboardInterrupt:  # e.g. while the dashboard draws: the record still reaches the others
                on_interrupt()
            except Exception as e:  # a display problem must not stop the run
                print(f"nbtune: metrics listener {listener!r} failed and is turned off: {e!r}", file=sys.stderr)
                listeners.remove(listener)


def _ranks_failed(folder: Path, launcher_error: BaseException | None) -> LaunchError:
    errors = sorted(folder.glob("error-rank*.json"))
    if not errors:
        return LaunchError(f"the data-parallel run failed before any rank reported: {launcher_error!r}")
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in errors]
    first = next((r for r in reports if r.get("fixable")), None) or reports[0]
    if first.get("fixable"):
        return LaunchError(first["message"], fixable=True)
    tail = "\n".join(first["traceback"].rstrip().splitlines()[-12:])
    return LaunchError(f"rank {first['rank']} of the data-parallel run failed: {first['type']}: {first['message']}"
                       f"\n{tail}")


def _launch_with_accelerate(function, args, processes: int, port: str) -> None:
    from accelerate import notebook_launcher

    notebook_launcher(function, args=args, num_processes=processes, use_port=port)


def launch_finetune(config, processes: int, *, resume=False, force: bool = False, gpu=None, listeners=(),
                    device: str = "cuda", flag: str = "gpus=", poll_s: float = 0.5) -> LaunchResult:
    """Train ``config`` data-parallel on ``processes`` GPUs (``device="cpu"``: gloo processes) from
    this notebook kernel; ``listeners`` (the dashboard) receive rank 0's metrics records live."""
    cfg = build_config(config)
    check_launch(processes, flag=flag, device=device)
    if processes < 2:
        raise LaunchError(f"{_shown(flag, processes)}: one process trains in this kernel "
                          "(nbtune.finetune without gpus); a launch starts 2 or more", fixable=True)
    folder = Path(tempfile.mkdtemp(prefix="nbtune-launch-"))
    (folder / FEED).touch()
    options = dict(resume=resume, force=force, gpu=gpu)
    outcome: dict = {}

    def run_launcher():
        try:
            _launch_with_accelerate(rank_main, (cfg.model_dump(), options, str(folder), os.getpid()), processes,
                                    _free_port())
        except BaseException as e:  # reported by the kernel's thread below
            outcome["error"] = e

    env = dict(TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "false"))
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    listeners = list(listeners)
    reader = _FeedReader(folder / FEED)
    interrupts = [0]

    def on_interrupt():
        interrupts[0] += 1
        if interrupts[0] > 2:  # the ranks did not stop: leave them to the launcher thread
            raise KeyboardInterrupt
        (folder / (STOP if interrupts[0] == 1 else ABORT)).touch()
        print("nbtune: interrupt received; every rank stops after the current step and saves a checkpoint "
              "(interrupt again to abort)" if interrupts[0] == 1 else "nbtune: second interrupt: aborting the run",
              file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.ERROR)  # "no signal handlers on a child thread": the stop file does that job
    try:
        with _environment(**env):
            thread = threading.Thread(target=run_launcher, name="nbtune-launcher", daemon=True)
            thread.start()
            while thread.is_alive():
                try:
                    thread.join(poll_s)
                except KeyboardInterrupt:
                    on_interrupt()
                _feed(listeners, reader.new_records(), on_interrupt)
    finally:
        elastic_log.setLevel(level)
    _feed(listeners, reader.new_records(), on_interrupt)
    if "error" in outcome or not (folder / RESULT).is_file():
        raise _ranks_failed(folder, outcome.get("error"))
    fields = json.loads((folder / RESULT).read_text(encoding="utf-8"))
    log_path = Path(fields["log_path"])
    metrics = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if log_path.is_file() else []
    fields["seconds"] = fields.get("seconds") or time.perf_counter() - t0
    return _launch_result(cfg, fields, metrics)


# ---------------------------------------------------------------------------- plan / dry run for N GPUs
@dataclasses.dataclass
class Report:
    """A plan or dry-run report made in a fresh process (text and HTML)."""

    text: str
    html_text: str

    def summary(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.html_text


def _report_in_child(config: dict, plan: bool, dry_run: bool, resume, gpu, world_size: int) -> tuple[str, str]:
    from ..train import finetune

    r = finetune(config, plan=plan, dry_run=dry_run, resume=resume, gpu=gpu, world_size=world_size)
    if r is None:
        return "nbtune: no plan (the planner is not available)", ""
    text = repr(r) if plan else str(r)
    return text, r._repr_html_() if hasattr(r, "_repr_html_") else "<pre>" + html.escape(text) + "</pre>"


def report_for_gpus(config, processes: int, *, plan: bool = False, dry_run: bool = False, resume=False,
                    gpu=None) -> Report:
    """The plan or dry-run report of a run on ``processes`` GPUs, made in a spawned process so that
    this kernel stays fit to launch (no CUDA, no bitsandbytes). Errors come back as they are."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cfg = build_config(config)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"gpus={processes!r}: give a whole number of GPUs, at least 1")
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        text, html_text = pool.submit(_report_in_child, cfg.model_dump(), plan, dry_run, resume, gpu,
                                      processes).result()
    return Report(text, html_text)
