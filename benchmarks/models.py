"""nbtune vs the Hugging Face QLoRA recipe vs Unsloth: tokens/s and peak memory, same run, same GPU.

    python benchmarks/models.py                                  # every row, every peer
    python benchmarks/models.py --rows main --peers nbtune,unsloth --time-budget 540
    python benchmarks/models.py --rows t4                        # T4 emulation: longest context
    python benchmarks/models.py --rows llama2-7b-1x2048-fp16 --peers nbtune,unsloth --rounds 3
    python benchmarks/models.py --rows 'llama2*,mistral-7b-1x2048-bf16'   # globs, any SHAPES row
    python benchmarks/models.py --list                           # rows and what they run
    python benchmarks/models.py --from-json                      # RESULTS.md from results/*.json, no GPU

Every (row, peer) runs in its own process (peers/hf_qlora_baseline.py, peers/unsloth_peer.py,
nbtune_peer.py), one after the other, on random-weight checkpoints built once under CKPT_ROOT.
The protocol is benchmarks/README.md's (3 warm-up + 8 timed steps, median; peak reserved memory).
``--rounds N`` runs each peer of a speed row N times, the peers' order alternating between rounds,
and keeps each peer's median run: a host's speed can drift by 10-25% between runs
(benchmarks/NOTES.md, "Measurement hygiene"), more than some of the ratios measured.

Rows: ``<shape>-<batch>x<seq>-<bf16|fp16>`` for any shape of peers/bench_common.py's SHAPES
(benchmarks/README.md's six are the ``main`` alias), and ``t4-<shape>``: the T4 emulation (fp16, batch 1,
MEM_CAP_GIB=14.3, SDPA memory-efficient backend only, and each peer process's host RAM capped at free
Colab's 12.7 GB by a memory cgroup, benchmarks/host_cap.py), which searches the longest context that
fits for each of its peers (nbtune and unsloth): 32k, 40k, 48k, ... stopping at a peer's first OOM,
on the GPU or on the host. Under the host cap nbtune checkpoints as ``gradient_checkpointing: auto``
does in a run (``NBTUNE_BENCH_GC=auto``: as many layers offloaded as the capped host holds, the rest
checkpointed on the GPU); its line says which.

Checks: nbtune's first loss must match the HF peer's (same weights, same tokens) within 1e-3
absolute on the unrounded values (``first_loss_exact``; where a peer only gives the 3-decimal
``first_loss``, 5e-4 of rounding slack is added per rounded value). The loss of a random-weight
model is ~ln(vocab) ~ 10-12, so 1e-3 absolute is ~1e-4 relative: tight enough to catch a wrong
computation, loose enough for bf16/fp16 summation order. Where HF has no loss (OOM), Unsloth's is
used if the context is within the checkpoint's max_position_embeddings (beyond it Unsloth stretches
RoPE, a different function). A mismatch, or an nbtune error, marks the row failed.

Output: results/models-<date>-<time>.json (meta: GPU, versions; every job's raw JSON lines,
status, seconds, stderr tail), results/models-<date>-<time>.log (the peers' stderr) and
RESULTS.md, regenerated from every results/models-*.json. The JSON is rewritten after every job,
so a run cut short keeps what it measured; rows the --time-budget did not reach are listed as such.
"""
from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
from bench_common import SHAPES, max_positions  # noqa: E402  (no torch import)

RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")

SPEED_TARGET = 1.10  # nbtune tokens/s >= 1.10 x Unsloth's, same run
MEMORY_TARGET = 0.95  # nbtune peak reserved <= 0.95 x Unsloth's
T4_CONTEXT_TARGET = 48 * 1024  # llama3-8b within the T4 emulation
LOSS_TOL = 1e-3
ROUNDING_SLACK = 5e-4  # half a unit of the peers' 3-decimal first_loss

PEERS = {  # name -> script, and the modules that must be importable for it to run at all
    "hf": dict(script=os.path.join(HERE, "peers", "hf_qlora_baseline.py"),
               needs=["torch", "transformers", "peft", "bitsandbytes"], label="HF+peft+bnb"),
    "unsloth": dict(script=os.path.join(HERE, "peers", "unsloth_peer.py"),
                    needs=["torch", "unsloth", "bitsandbytes"], label="Unsloth"),
    "nbtune": dict(script=os.path.join(HERE, "nbtune_peer.py"),
                   needs=["torch", "nbtune", "nbtune.kernels", "bitsandbytes"], label="nbtune"),
}
PEER_ORDER = ["hf", "unsloth", "nbtune"]
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "bfloat16": "bfloat16", "float16": "float16"}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}

MAIN_ROWS = ["llama3-8b-2x2048-bf16", "llama3-8b-1x2048-fp16", "llama3-8b-1x8192-bf16",
             "llama3-8b-1x16384-bf16", "llama2-7b-2x2048-bf16", "llama2-7b-1x2048-fp16"]
T4_ROWS = ["t4-llama3-8b"]
ALIASES = {"main": MAIN_ROWS, "t4": T4_ROWS, "all": MAIN_ROWS + T4_ROWS}

T4_CAP_GIB = 14.3
T4_HOST_CAP_GB = 12.7  # free Colab's RAM for the whole machine
T4_SDPA = "efficient"
T4_CONTEXTS = [32768 + 8192 * i for i in range(13)]  # 32k, 40k, 48k, ... 128k
T4_PEERS = ["nbtune", "unsloth"]


@dataclass
class Row:
    id: str
    shape: str
    batch: int
    seq: int
    dtype: str  # torch attribute name: bfloat16 | float16
    kind: str = "speed"  # speed | t4

    @property
    def spec(self) -> str:
        return f"{self.shape}:{self.batch}:{self.seq}:{self.dtype}"

    def label(self) -> str:
        if self.kind == "t4":
            return f"{self.shape} T4 emulation"
        return f"{self.shape} {self.batch}×{self.seq} {SHORT_DTYPE.get(self.dtype, self.dtype)}"


_ROW_RE = re.compile(r"^(?P<shape>.+)-(?P<batch>\d+)x(?P<seq>\d+)-(?P<dtype>bf16|fp16|bfloat16|float16)$")


def parse_row(row_id: str) -> Row:
    """``<shape>-<batch>x<seq>-<dtype>`` or ``t4-<shape>``; the shape must be in SHAPES."""
    if row_id.startswith("t4-"):
        shape = row_id[3:]
        if shape not in SHAPES:
            raise ValueError(f"row {row_id!r}: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        return Row(row_id, shape, 1, 0, "float16", "t4")
    m = _ROW_RE.match(row_id)
    if not m:
        raise ValueError(f"row {row_id!r}: expected <shape>-<batch>x<seq>-<bf16|fp16> or t4-<shape>")
    if m["shape"] not in SHAPES:
        raise ValueError(f"row {row_id!r}: unknown shape {m['shape']!r} (known: {', '.join(SHAPES)})")
    dtype = DTYPE_NAMES[m["dtype"]]
    canonical = f"{m['shape']}-{int(m['batch'])}x{int(m['seq'])}-{SHORT_DTYPE[dtype]}"
    return Row(canonical, m["shape"], int(m["batch"]), int(m["seq"]), dtype, "speed")


def select_rows(text: str, aliases=None, parse=None, known=None) -> list:
    """Comma-separated row ids, aliases (main, t4, all) and globs over the known rows (``aliases``
    and ``parse``: another benchmark's row table and row parser; default this one's; ``known``: the
    rows globs match, default the ``all`` alias's)."""
    aliases, parse = aliases or ALIASES, parse or parse_row
    known = known or aliases["all"]
    chosen: list[str] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if part in aliases:
            names = aliases[part]
        elif any(ch in part for ch in "*?["):
            names = [r for r in known if fnmatch.fnmatch(r, part)]
            if not names:
                raise ValueError(f"--rows: {part!r} matches no row (rows: {', '.join(known)})")
        else:
            names = [parse(part).id]
        chosen += [n for n in names if n not in chosen]
    if not chosen:
        raise ValueError("--rows: no row selected")
    return [parse(n) for n in chosen]


def parse_peers(text: str, known=None) -> list[str]:
    known = known or PEERS
    peers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in peers if p not in known]
    if unknown or not peers:
        raise ValueError(f"--peers: unknown {unknown} (known: {', '.join(known)})")
    return list(dict.fromkeys(peers))


def parse_steps(text: str, example: str = "3:8") -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not m or int(m[2]) < 1:
        raise argparse.ArgumentTypeError(f"expected WARMUP:STEPS with STEPS >= 1 (e.g. {example}), got {text!r}")
    return int(m[1]), int(m[2])


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="all", help="row ids, aliases (main, t4, all) or globs, comma-separated")
    ap.add_argument("--peers", default="hf,unsloth,nbtune", help="which peers, in run order (hf, unsloth, nbtune)")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds for the whole run (0: none); "
                    "rows that would start after it are reported as not reached")
    ap.add_argument("--rounds", type=_positive_int, default=1,
                    help="runs per peer in speed rows, the peers' order alternating between rounds (A B, B A, "
                         "A B, ...); each peer's result is its median run (the lower middle one for an even "
                         "count). The hosts are noisy: use 3 where a ratio is near 1.0")
    ap.add_argument("--row-timeout", type=float, default=420, help="seconds one peer process may take")
    ap.add_argument("--min-job-s", type=float, default=45,
                    help="do not start a peer process with less than this (or 0.8x that peer's last time) left")
    ap.add_argument("--t4-contexts", default=",".join(map(str, T4_CONTEXTS)),
                    help="contexts the T4 search tries, in order, per peer, until its first OOM")
    ap.add_argument("--t4-peers", default=",".join(T4_PEERS), help="peers searched in t4 rows (also in --peers)")
    ap.add_argument("--t4-cap-gib", type=float, default=T4_CAP_GIB)
    ap.add_argument("--t4-host-cap-gb", type=float, default=T4_HOST_CAP_GB,
                    help="host RAM cap of each t4 peer process in GB (a memory cgroup, as free Colab's 12.7 GB; 0: none)")
    ap.add_argument("--t4-sdpa", default=T4_SDPA, help="SDPA backend allowed in t4 rows (NBTUNE_BENCH_SDPA)")
    ap.add_argument("--t4-steps", type=parse_steps, default=None, metavar="W:S",
                    help="warm-up:timed steps in t4 rows (unsloth and nbtune honour it; default 3:8)")
    ap.add_argument("--ckpt-root", default=os.environ.get("CKPT_ROOT", "/tmp/ckpt"))
    ap.add_argument("--no-build", action="store_true", help="do not build checkpoints first (peers build if missing)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the peer processes")
    ap.add_argument("--peer-site", default=os.environ.get("NBTUNE_BENCH_PEER_SITE", ""),
                    help="path(s) put first on PYTHONPATH for the unsloth process only (e.g. /tmp/site_peer)")
    ap.add_argument("--out-dir", default=RESULTS_DIR, help="where models-<date>.json and its .log go")
    ap.add_argument("--markdown", default=RESULTS_MD, help="RESULTS.md to regenerate ('' for none)")
    ap.add_argument("--tag", default="", help="a note stored in the run's meta")
    ap.add_argument("--from-json", nargs="*", metavar="JSON", default=None,
                    help="only regenerate the markdown from these result files (none given: out-dir/models-*.json)")
    ap.add_argument("--summary", action="store_true",
                    help="with --from-json: also print each file's short summary table")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--dry-run", action="store_true", help="print the jobs and exit")
    return ap


# ----------------------------------------------------------------------------------------------
# Running one peer process
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    row: str
    peer: str
    spec: str
    status: str = "pending"  # ok | oom | error | timeout | skipped | not_reached
    detail: str = ""
    seconds: float = 0.0
    line: dict | None = None
    lines: list = field(default_factory=list)
    stderr_tail: str = ""
    env: dict = field(default_factory=dict)
    sdpa: dict | None = None
    host: dict | None = None  # t4 rows: the host-RAM cap, whether it held, the peak RSS


def peer_env(peer: str, args, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["CKPT_ROOT"] = args.ckpt_root
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    for key in ("MEM_CAP_GIB", "NBTUNE_BENCH_SDPA", "WARMUP", "STEPS"):
        env.pop(key, None)  # only what the row asks for
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if peer == "unsloth" and args.peer_site:
        paths = [p for p in args.peer_site.split(os.pathsep) if p] + paths
    # nbtune itself must be importable: installed (pip install -e .) or gpu_suite.sh's PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def parse_output(stdout: str, stderr: str) -> tuple[list[dict], dict | None]:
    """The peer's JSON result lines (dicts with a 'peer' key) and its '# bench-sdpa' report."""
    lines = []
    for text in stdout.splitlines():
        text = text.strip()
        if not text.startswith("{"):
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if isinstance(obj, dict) and "peer" in obj:
            lines.append(obj)
    sdpa = None
    for text in stderr.splitlines():
        if text.startswith("# bench-sdpa "):
            try:
                sdpa = json.loads(text[len("# bench-sdpa "):])
            except ValueError:
                pass
    return lines, sdpa


_OOM_RE = re.compile(r"out of memory|OutOfMemoryError|CUDA_ERROR_OUT_OF_MEMORY", re.I)


def classify(job: Job, rc: int | None, lines: list[dict], stderr: str, timed_out: bool) -> None:
    """Set job.status/detail/line from what the process printed and how it ended."""
    job.lines = lines
    result = next((l for l in reversed(lines) if "tokens_per_s" in l), None)
    oom = next((l for l in reversed(lines) if str(l.get("error", "")).upper() == "OOM"), None)
    if result is not None:
        job.status, job.line = "ok", result
    elif oom is not None:
        job.status, job.line = "oom", oom
        job.detail = oom.get("detail", "")
    elif job.host and job.host.get("oom_kills") and rc != 0:
        job.status = "oom"
        job.detail = f"host RAM: OOM-killed at the {job.host['cap_gb']} GB cap"
    elif timed_out:
        job.status, job.detail = "timeout", f"killed after {job.seconds:.0f} s"
    elif rc != 0 and _OOM_RE.search(stderr or ""):
        job.status = "oom"
        job.detail = "out of memory outside the peer's handler: " + _last_error_line(stderr)
    else:
        job.status = "error"
        job.detail = (f"exit {rc}: " if rc else "no result line: ") + _last_error_line(stderr)


def _last_error_line(stderr: str) -> str:
    lines = [l.strip() for l in (stderr or "").splitlines() if l.strip() and not l.startswith("#")]
    for text in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", text) or "Error:" in text:
            return text[:400]
    return lines[-1][:400] if lines else ""


class Terminated(Exception):
    """SIGTERM reached the driver (e.g. the suite's `timeout`): stop the peer, keep what was measured."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _stop_group(proc: subprocess.Popen) -> None:
    """Terminate, then kill, the process group of a peer this driver started (and only that)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process(cmd: list[str], env: dict, timeout: float, cwd: str | None = None, host_cap_gb: float = 0,
                host: dict | None = None):
    """(rc, stdout, stderr, timed_out): output goes through files (no pipe deadlocks). The peer gets
    its own process group (not a new session, so nothing outlives the command that started the
    driver); on timeout, or if the driver itself is stopped, that group is terminated, then killed.

    ``host_cap_gb`` > 0: the peer runs in a memory cgroup of that size (benchmarks/host_cap.py's
    CappedChild), as on free Colab; ``host`` (a dict) receives whether the cap held, the peak RSS
    (the peer's own, not this driver's pages) and the OOM kills."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        popen = dict(stdout=out, stderr=err, env=env, cwd=cwd)
        child = None
        if host_cap_gb > 0:
            child = _sibling("host_cap").CappedChild(cmd, host_cap_gb, setup=os.setpgrp, **popen)
            proc = child.proc
        else:
            proc = subprocess.Popen(cmd, preexec_fn=os.setpgrp, **popen)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc)
            rc = proc.returncode
        except BaseException:
            _stop_group(proc)
            raise
        finally:
            if child is not None:
                child.finish()
                if host is not None and child.capped:
                    host.update(capped=True, oom_kills=child.oom_kills)
        if host is not None and child is not None:
            host.setdefault("capped", False)
            host["cap_gb"] = host_cap_gb
            if child.peak_bytes is not None:
                host["peak_rss_gb"] = round(child.peak_bytes / 1e9, 3)
        out.seek(0); err.seek(0)
        return rc, out.read(), err.read(), timed_out


def check_peer_available(peer: str, args) -> str | None:
    """None if the peer's modules can be found in its environment, else why not."""
    needs = PEERS[peer]["needs"]
    code = ("import importlib.util, json, sys\n"
            "def found(m):\n"
            "    try:\n        return importlib.util.find_spec(m) is not None\n"
            "    except Exception:\n        return False\n"
            "print(json.dumps([m for m in sys.argv[1:] if not found(m)]))")
    rc, out, err, _ = run_process([args.python, "-c", code, *needs], peer_env(peer, args), timeout=120,
                                  cwd=REPO)
    if rc != 0:
        return f"availability check failed: {_last_error_line(err)}"
    try:
        missing = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"availability check printed {out.strip()[:200]!r}"
    return f"not installed: {', '.join(missing)}" if missing else None


# ----------------------------------------------------------------------------------------------
# Meta: GPU and versions, read without importing torch in this process
# ----------------------------------------------------------------------------------------------
VERSION_PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "trl", "triton", "accelerate",
                    "unsloth", "unsloth_zoo", "nbtune"]
_META_CODE = r"""
import importlib.metadata as md, importlib.util, json, os, re, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = md.version(name)
    except Exception:
        out[name] = None
try:
    spec = importlib.util.find_spec("torch")
    text = open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")).read()
    m = re.search(r"^cuda\s*[:=].*?['\"]([^'\"]+)['\"]", text, re.M)
    out["torch_cuda"] = m.group(1) if m else None
except Exception:
    out["torch_cuda"] = None
out["python"] = sys.version.split()[0]
print(json.dumps(out))
"""


def collect_meta(args, peers: list[str]) -> dict:
    meta = dict(host=os.uname().nodename, python_exe=args.python, ckpt_root=args.ckpt_root)
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        first = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else ""
        if first:
            name, mem, driver = [x.strip() for x in first.split(",")[:3]]
            meta.update(gpu=name, gpu_memory=mem, driver=driver)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    meta.setdefault("gpu", "unknown (no nvidia-smi)")
    envs = {"main": "nbtune"} | ({"peer": "unsloth"} if "unsloth" in peers and args.peer_site else {})
    for key, peer in envs.items():
        rc, out, err, _ = run_process([args.python, "-c", _META_CODE, *VERSION_PACKAGES],
                                      peer_env(peer, args), timeout=60, cwd=REPO)
        try:
            meta[f"versions_{key}" if key != "main" else "versions"] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            meta[f"versions_{key}" if key != "main" else "versions"] = {"error": _last_error_line(err)}
    return meta


# ----------------------------------------------------------------------------------------------
# Checks and ratios (pure functions over result lines: the CPU tests exercise them)
# ----------------------------------------------------------------------------------------------
def loss_of(line: dict) -> tuple[float | None, float]:
    """(first loss, rounding slack): the exact value when the peer gives it."""
    if line is None:
        return None, 0.0
    if line.get("first_loss_exact") is not None:
        return float(line["first_loss_exact"]), 0.0
    if line.get("first_loss") is not None:
        return float(line["first_loss"]), ROUNDING_SLACK
    return None, 0.0


def compare_losses(a: dict, b: dict, tol: float = LOSS_TOL) -> dict | None:
    la, sa = loss_of(a)
    lb, sb = loss_of(b)
    if la is None or lb is None:
        return None
    diff = abs(la - lb)
    limit = tol + sa + sb
    return dict(a=la, b=lb, diff=diff, tol=limit, ok=diff <= limit)


def first_loss_check(results: dict[str, dict], shape: str, seq: int, tol: float = LOSS_TOL) -> dict:
    """nbtune's first loss against HF's (else Unsloth's, within the checkpoint's positions).

    ``results``: peer -> job dict (status, line). Returns dict(status=ok|mismatch|unchecked|n/a, ...).
    """
    def ok_line(peer):
        job = results.get(peer)
        return job["line"] if job and job.get("status") == "ok" and job.get("line") else None

    nb, hf, un = ok_line("nbtune"), ok_line("hf"), ok_line("unsloth")
    check = {}
    if hf and un:
        info = compare_losses(un, hf, tol)
        if info:
            check["unsloth_vs_hf"] = round(info["diff"], 6)
    if nb is None:
        check.update(status="n/a", reason="no nbtune result")
        return check
    if hf is not None:
        ref, ref_line = "hf", hf
    elif un is not None and seq <= max_positions(shape):
        ref, ref_line = "unsloth", un
    else:
        check.update(status="unchecked",
                     reason="no HF loss" + (" and Unsloth stretches RoPE past the checkpoint's positions"
                                            if un is not None else ""))
        return check
    info = compare_losses(nb, ref_line, tol)
    if info is None:
        check.update(status="unchecked", reason="a first loss is missing")
        return check
    check.update(status="ok" if info["ok"] else "mismatch", reference=ref, nbtune=info["a"], ref_loss=info["b"],
                 diff=round(info["diff"], 6), tol=info["tol"])
    return check


def ratios(results: dict[str, dict]) -> dict:
    """nbtune/unsloth and nbtune/hf for tokens/s and peak reserved GiB, and the targets vs Unsloth."""
    def val(peer, key):
        job = results.get(peer)
        if job and job.get("status") == "ok" and job.get("line") and job["line"].get(key):
            return float(job["line"][key])
        return None

    out = {}
    nb_speed, nb_mem = val("nbtune", "tokens_per_s"), val("nbtune", "peak_reserved_gib")
    for ref in ("unsloth", "hf"):
        speed, mem = val(ref, "tokens_per_s"), val(ref, "peak_reserved_gib")
        out[f"speed_vs_{ref}"] = round(nb_speed / speed, 3) if nb_speed and speed else None
        out[f"memory_vs_{ref}"] = round(nb_mem / mem, 3) if nb_mem and mem else None
    s, m = out["speed_vs_unsloth"], out["memory_vs_unsloth"]
    out["speed_target"] = None if s is None else ("met" if s >= SPEED_TARGET else "not met")
    out["memory_target"] = None if m is None else ("met" if m <= MEMORY_TARGET else "not met")
    return out


def row_status(results: dict[str, dict], check: dict | None) -> str:
    """failed: nbtune broke, or its first loss does not match; else ok / incomplete."""
    nb = results.get("nbtune")
    if nb and nb.get("status") in ("error", "timeout"):
        return "failed"
    if check and check.get("status") == "mismatch":
        return "failed"
    statuses = [j.get("status") for j in results.values()]
    if any(s in ("not_reached", "error", "timeout") for s in statuses):
        return "incomplete"
    return "ok"


def median_job(jobs: list[dict]) -> dict:
    """A peer's result over several rounds: its run with the median tokens/s (the lower middle one for
    an even count: the same rule for every peer), with every round's figures under ``rounds``. Before
    any round succeeded, the latest run."""
    ok = sorted((j for j in jobs if j.get("status") == "ok" and j.get("line")), key=lambda j: j["line"]["tokens_per_s"])
    chosen = dict(ok[(len(ok) - 1) // 2] if ok else jobs[-1])
    chosen["rounds"] = [dict(status=j.get("status"), tokens_per_s=(j.get("line") or {}).get("tokens_per_s"),
                             peak_reserved_gib=(j.get("line") or {}).get("peak_reserved_gib")) for j in jobs]
    return chosen


def t4_summary(attempts: list[dict]) -> dict:
    """Longest context that fitted, the first that did not, and why the search stopped."""
    fitted = [a for a in attempts if a["status"] == "ok"]
    best = max(fitted, key=lambda a: a["seq"]) if fitted else None
    first_oom = next((a["seq"] for a in attempts if a["status"] == "oom"), None)
    last = attempts[-1]["status"] if attempts else "not_reached"
    stopped = {"ok": "all contexts fitted", "oom": "first OOM"}.get(last, last)
    out = dict(longest=best["seq"] if best else None, first_oom=first_oom, stopped=stopped)
    if best and best.get("line"):
        out.update(tokens_per_s=best["line"].get("tokens_per_s"), peak_reserved_gib=best["line"].get("peak_reserved_gib"))
    if best and best.get("host"):
        out["host_peak_rss_gb"] = best["host"].get("peak_rss_gb")
        out["host_capped"] = best["host"].get("capped")
    if best and best.get("sdpa"):
        out["sdpa_calls"] = best["sdpa"].get("calls")  # >0: the peer's attention went through the restricted SDPA
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args, rows: list[Row], peers: list[str]):
        self.args, self.rows, self.peers = args, rows, peers
        self.start = time.time()
        self.deadline = self.start + args.time_budget if args.time_budget > 0 else None
        self.last_seconds: dict[str, float] = {}
        self.unavailable: dict[str, str] = {}
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        os.makedirs(args.out_dir, exist_ok=True)
        self.json_path = os.path.join(args.out_dir, f"models-{stamp}.json")
        self.log_path = os.path.join(args.out_dir, f"models-{stamp}.log")
        self.doc = dict(meta=dict(started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                  argv=sys.argv[1:], peers=peers, rows=[r.id for r in rows],
                                  time_budget_s=args.time_budget, row_timeout_s=args.row_timeout,
                                  tag=args.tag, loss_tol=LOSS_TOL, rounds=max(1, args.rounds),
                                  targets=dict(speed=SPEED_TARGET, memory=MEMORY_TARGET,
                                               t4_context=T4_CONTEXT_TARGET),
                                  t4=dict(cap_gib=args.t4_cap_gib, sdpa=args.t4_sdpa,
                                          steps=list(args.t4_steps) if args.t4_steps else None)),
                        rows=[], raw=[])

    # -- bookkeeping
    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def save(self):
        self.doc["meta"]["elapsed_s"] = round(time.time() - self.start, 1)
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.json_path)

    def log(self, text: str):
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    # -- one job
    def run_job(self, row: Row, peer: str, spec: str, extra_env: dict | None = None, host_cap_gb: float = 0) -> Job:
        job = Job(row=row.id, peer=peer, spec=spec, env=dict(extra_env or {}), host={} if host_cap_gb > 0 else None)
        if peer in self.unavailable:
            job.status, job.detail = "skipped", self.unavailable[peer]
            return job
        left = self.remaining()
        need = max(self.args.min_job_s, 0.8 * self.last_seconds.get(peer, 0))
        if left < need:
            job.status, job.detail = "not_reached", f"time budget: {max(left, 0):.0f} s left, ~{need:.0f} s needed"
            return job
        timeout = min(self.args.row_timeout, left)
        cwd = REPO
        if peer == "unsloth":  # unsloth writes unsloth_compiled_cache/ into its working directory
            cwd = os.path.join(tempfile.gettempdir(), "nbtune-bench-unsloth")
            os.makedirs(cwd, exist_ok=True)
        cmd = [self.args.python, PEERS[peer]["script"], spec]
        print(f"[{time.time() - self.start:6.0f}s] {row.id} · {peer}: {spec} {' '.join(f'{k}={v}' for k, v in job.env.items())}",
              flush=True)
        t0 = time.time()
        rc, out, err, timed_out = run_process(cmd, peer_env(peer, self.args, job.env), timeout, cwd=cwd,
                                              host_cap_gb=host_cap_gb, host=job.host)
        job.seconds = round(time.time() - t0, 1)
        self.last_seconds[peer] = job.seconds
        lines, job.sdpa = parse_output(out, err)
        classify(job, rc, lines, err, timed_out)
        if timed_out and timeout < self.args.row_timeout:
            job.detail += " (time budget)"
        if job.status in ("error", "timeout"):
            job.stderr_tail = "\n".join(err.splitlines()[-40:])
        self.log(f"===== {row.id} · {peer} · {spec} · rc={rc} · {job.seconds}s · {job.status}\n--- stdout\n{out}--- stderr\n{err}")
        for line in lines:
            self.doc["raw"].append(dict(row=row.id, peer_key=peer, **line))
        brief = job.detail or ""
        if job.line and job.status == "ok":
            brief = f"{job.line['tokens_per_s']:,} tok/s · {job.line['peak_reserved_gib']} GiB · loss {job.line.get('first_loss')}"
        print(f"        -> {job.status} in {job.seconds:.0f}s {brief}", flush=True)
        return job

    # -- rows
    def run_speed_row(self, row: Row) -> dict:
        rec = dict(id=row.id, kind="speed", shape=row.shape, batch=row.batch, seq=row.seq, dtype=row.dtype,
                   label=row.label(), results={})
        self.doc["rows"].append(rec)
        rounds = max(1, self.args.rounds)
        runs: dict[str, list] = {peer: [] for peer in self.peers}
        for r in range(rounds):
            for peer in (self.peers if r % 2 == 0 else self.peers[::-1]):
                if not runs[peer]:
                    rec["results"][peer] = dict(status="pending", row=row.id, peer=peer, spec=row.spec, line=None)
                runs[peer].append(asdict(self.run_job(row, peer, row.spec)))
                rec["results"][peer] = median_job(runs[peer]) if rounds > 1 else runs[peer][0]
                self.finish_speed_row(rec)
                self.save()
        return rec

    def finish_speed_row(self, rec: dict):
        rec["first_loss"] = first_loss_check(rec["results"], rec["shape"], rec["seq"])
        rec["ratios"] = ratios(rec["results"])
        rec["status"] = row_status(rec["results"], rec["first_loss"])

    def run_t4_row(self, row: Row) -> dict:
        contexts = [int(c) for c in str(self.args.t4_contexts).split(",") if c.strip()]
        t4_peers = [p for p in self.peers if p in parse_peers(self.args.t4_peers)]
        rec = dict(id=row.id, kind="t4", shape=row.shape, batch=1, dtype="float16", label=row.label(),
                   cap_gib=self.args.t4_cap_gib, host_cap_gb=self.args.t4_host_cap_gb, sdpa=self.args.t4_sdpa,
                   contexts=contexts, search={})
        self.doc["rows"].append(rec)
        env = {"MEM_CAP_GIB": str(self.args.t4_cap_gib), "NBTUNE_BENCH_SDPA": self.args.t4_sdpa}
        if self.args.t4_host_cap_gb > 0:  # nbtune checkpoints as finetune's "auto" does within the host's RAM
            env["NBTUNE_BENCH_GC"] = "auto"
        if self.args.t4_steps:
            env.update(WARMUP=str(self.args.t4_steps[0]), STEPS=str(self.args.t4_steps[1]))
        for peer in t4_peers:
            attempts = []
            rec["search"][peer] = dict(attempts=attempts)
            for seq in contexts:
                spec = f"{row.shape}:1:{seq}:float16"
                attempts.append(dict(seq=seq, status="pending", row=row.id, peer=peer, spec=spec, line=None))
                job = self.run_job(row, peer, spec, env, host_cap_gb=self.args.t4_host_cap_gb)
                attempts[-1] = dict(seq=seq, **asdict(job))
                rec["search"][peer].update(t4_summary(attempts))
                self.save()
                if job.status != "ok":
                    break
        nb = rec["search"].get("nbtune", {}).get("longest")
        rec["target"] = None if "nbtune" not in rec["search"] else ("met" if (nb or 0) >= T4_CONTEXT_TARGET else "not met")
        statuses = [a["status"] for s in rec["search"].values() for a in s["attempts"]]
        nb_attempts = rec["search"].get("nbtune", {}).get("attempts", [])
        rec["status"] = ("failed" if any(a["status"] in ("error", "timeout") for a in nb_attempts)
                         else "incomplete" if any(s in ("not_reached", "error", "timeout") for s in statuses) else "ok")
        self.save()
        return rec

    def build_checkpoints(self):
        shapes = list(dict.fromkeys(r.shape for r in self.rows))
        todo = [s for s in shapes if not (os.path.isfile(os.path.join(self.args.ckpt_root, s, "config.json"))
                                          and os.path.isfile(os.path.join(self.args.ckpt_root, s, "tokenizer.json")))]
        self.doc["meta"]["checkpoints"] = {s: os.path.join(self.args.ckpt_root, s) for s in shapes}
        if not todo or self.args.no_build:
            return
        print(f"[{time.time() - self.start:6.0f}s] building checkpoints {', '.join(todo)} under {self.args.ckpt_root}", flush=True)
        t0 = time.time()
        rc, out, err, timed_out = run_process(
            [self.args.python, os.path.join(HERE, "peers", "bench_common.py"), "build", *todo],
            peer_env("hf", self.args), timeout=max(self.remaining(), 60) if self.deadline else 3600, cwd=REPO)
        self.log(f"===== build {todo} rc={rc} {time.time() - t0:.0f}s\n{out}{err}")
        self.doc["meta"]["build_s"] = round(time.time() - t0, 1)
        if rc != 0:
            print(f"        -> checkpoint build failed (rc={rc}): {_last_error_line(err)}", flush=True)
            self.doc["meta"]["build_error"] = _last_error_line(err)
        else:
            print(f"        -> built in {time.time() - t0:.0f}s", flush=True)

    def run(self) -> dict:
        self.doc["meta"].update(collect_meta(self.args, self.peers))
        for peer in self.peers:
            why = check_peer_available(peer, self.args)
            if why:
                self.unavailable[peer] = why
                print(f"# peer {peer} skipped: {why}", flush=True)
        self.doc["meta"]["unavailable"] = dict(self.unavailable)
        self.save()
        try:
            self.build_checkpoints()
            for row in self.rows:
                if row.kind == "t4":
                    self.run_t4_row(row)
                else:
                    self.run_speed_row(row)
        except (Terminated, KeyboardInterrupt):
            print("# stopped from outside (SIGTERM/interrupt): results so far are kept", flush=True)
            self.doc["meta"]["terminated"] = True
            for rec in self.doc["rows"]:
                jobs = list(rec.get("results", {}).values()) + [
                    a for srch in rec.get("search", {}).values() for a in srch.get("attempts", [])]
                for j in jobs:
                    if j.get("status") == "pending":
                        j["status"], j["detail"] = "not_reached", "driver stopped"
                if rec.get("kind") == "speed":
                    self.finish_speed_row(rec)
                else:
                    for srch in rec.get("search", {}).values():
                        srch.update(t4_summary(srch["attempts"]))
                    rec.setdefault("status", "incomplete")
            done = {rec["id"] for rec in self.doc["rows"]}
            for row in self.rows:
                if row.id not in done:
                    rec = dict(id=row.id, kind=row.kind, shape=row.shape, batch=row.batch, seq=row.seq,
                               dtype=row.dtype, label=row.label(), status="not_reached")
                    if row.kind == "speed":
                        rec["results"] = {p: dict(status="not_reached", detail="driver stopped", spec=row.spec,
                                                  line=None) for p in self.peers}
                    else:
                        rec["search"] = {}
                    self.doc["rows"].append(rec)
        self.doc["meta"]["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.save()
        return self.doc


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def fmt_cell(job: dict | None) -> str:
    if job is None:
        return "—"
    status = job.get("status")
    if status == "ok" and job.get("line"):
        return f"{job['line']['tokens_per_s']:,} · {job['line']['peak_reserved_gib']:.2f}"
    if status == "oom":
        return "OOM"
    if status == "skipped":
        return "skipped"
    if status == "not_reached":
        return "not reached"
    return status or "—"


def fmt_ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def fmt_target(value) -> str:
    return {"met": "met", "not met": "**not met**"}.get(value, "—")


def fmt_check(check: dict | None) -> str:
    if not check:
        return "—"
    status = check.get("status")
    if status == "ok":
        return f"ok (Δ {check['diff']:.1e} vs {check['reference']})"
    if status == "mismatch":
        return f"**MISMATCH** ({check['nbtune']:.4f} vs {check['reference']} {check['ref_loss']:.4f})"
    return status or "—"


def run_label(doc: dict, path: str) -> str:
    meta = doc.get("meta", {})
    return os.path.basename(path).replace("models-", "").replace(".json", "") or meta.get("started", "?")


def speed_table(rows: list[tuple[str, dict]]) -> list[str]:
    out = ["| row | run | HF+peft+bnb tok/s · GiB | Unsloth tok/s · GiB | nbtune tok/s · GiB | speed nbtune/Unsloth "
           "| memory nbtune/Unsloth | speed nbtune/HF | memory nbtune/HF | first loss | ≥1.10× speed | ≤0.95× memory | row |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, rec in rows:
        r, res = rec.get("ratios", {}), rec.get("results", {})
        out.append(f"| {rec['label']} | {run} | {fmt_cell(res.get('hf'))} | {fmt_cell(res.get('unsloth'))} | "
                   f"{fmt_cell(res.get('nbtune'))} | {fmt_ratio(r.get('speed_vs_unsloth'))} | "
                   f"{fmt_ratio(r.get('memory_vs_unsloth'))} | {fmt_ratio(r.get('speed_vs_hf'))} | "
                   f"{fmt_ratio(r.get('memory_vs_hf'))} | {fmt_check(rec.get('first_loss'))} | "
                   f"{fmt_target(r.get('speed_target'))} | {fmt_target(r.get('memory_target'))} | {rec.get('status', '—')} |")
    return out


def t4_table(rows: list[tuple[str, dict]]) -> list[str]:
    out = ["| row | run | peer | longest context that fits | tok/s there | peak reserved GiB | host peak RSS GB "
           "| first OOM | search stopped | SDPA calls | ≥48k (nbtune) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, rec in rows:
        for peer, s in rec.get("search", {}).items():
            longest = f"{s['longest']:,}" if s.get("longest") else "none"
            tps = f"{s['tokens_per_s']:,}" if s.get("tokens_per_s") else "—"
            peak = f"{s['peak_reserved_gib']:.2f}" if s.get("peak_reserved_gib") is not None else "—"
            oom = f"{s['first_oom']:,}" if s.get("first_oom") else "—"
            target = fmt_target(rec.get("target")) if peer == "nbtune" else ""
            calls = s.get("sdpa_calls")
            rss = "—" if s.get("host_peak_rss_gb") is None else (
                f"{s['host_peak_rss_gb']:.2f}" + ("" if s.get("host_capped") else " (cap not enforced)"))
            out.append(f"| {rec['label']} | {run} | {PEERS.get(peer, {}).get('label', peer)} | {longest} | {tps} | "
                       f"{peak} | {rss} | {oom} | {s.get('stopped', '—')} | {'—' if calls is None else f'{calls:,}'} "
                       f"| {target} |")
    return out


def meta_line(doc: dict) -> str:
    m = doc.get("meta", {})
    v = m.get("versions", {}) or {}
    vp = m.get("versions_peer", {}) or {}
    parts = [f"GPU {m.get('gpu', '?')}"]
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "triton", "nbtune"):
        if v.get(name):
            parts.append(f"{name} {v[name]}")
    if vp.get("unsloth") or v.get("unsloth"):
        parts.append(f"unsloth {vp.get('unsloth') or v.get('unsloth')} (trl {vp.get('trl') or v.get('trl')})")
    if m.get("unavailable"):
        parts.append("skipped: " + "; ".join(f"{k} ({w})" for k, w in m["unavailable"].items()))
    t4 = m.get("t4") or {}
    if t4.get("steps"):
        parts.append(f"T4 search with {t4['steps'][0]} warm-up + {t4['steps'][1]} timed steps")
    if (m.get("rounds") or 1) > 1:
        parts.append(f"speed rows: median of {m['rounds']} runs per peer, order alternating")
    if m.get("tag"):
        parts.append(f"tag: {m['tag']}")
    return ", ".join(parts)


def load_results(paths: list[str]) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(paths):
        try:
            with open(path) as f:
                docs.append((path, json.load(f)))
        except (OSError, ValueError) as exc:
            print(f"# skipping {path}: {exc}", file=sys.stderr)
    return docs


def _sibling(name: str):
    """benchmarks/<name>.py (benchmarks/ is no package: loaded by path, once)."""
    if name not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _trainer_report():
    """benchmarks/trainer_report.py, the trainer path's tables."""
    return _sibling("trainer_report")


def _export_report():
    """benchmarks/export_report.py, the full-size export's table."""
    return _sibling("export_report")


def render_markdown(docs: list[tuple[str, dict]], trainer_docs: list[tuple[str, dict]] = (),
                    export_docs: list[tuple[str, dict]] = ()) -> str:
    """RESULTS.md: the trainer path's table when there are trainer results (benchmarks/trainer.py),
    then the latest measurement of every row here, the newest full-size export
    (benchmarks/export_8b.py), then every run in full (newest first)."""
    lines = ["# nbtune benchmarks: results",
             ""]
    if trainer_docs:
        lines += _trainer_report().lead_section(list(trainer_docs))
        if len(lines) > 2:
            lines += ["## Bare training loops (benchmarks/models.py)", ""]
    lines += [
             "Generated by `python benchmarks/models.py --from-json` from `benchmarks/results/models-*.json`; "
             "do not edit. Protocol: benchmarks/README.md (random-weight checkpoints, NF4 double-quant, LoRA r=16 on "
             "q,k,v,o,gate,up,down, AdamW 8-bit, 3 warm-up + 8 timed steps, median; memory = peak reserved). "
             "Each cell: tokens/s · peak reserved GiB. Ratios compare peers of the same run only. Targets: "
             f"speed ≥ {SPEED_TARGET:.2f}× Unsloth, memory ≤ {MEMORY_TARGET:.2f}× Unsloth, T4 emulation context "
             f"≥ {T4_CONTEXT_TARGET // 1024}k. First loss: nbtune vs HF (else Unsloth) within {LOSS_TOL:g} absolute.",
             ""]
    if not docs:
        lines += ["No results yet: run `benchmarks/gpu_suite.sh models` on the GPU machine.", ""]
        return "\n".join(lines)
    newest_first = list(reversed(docs))
    latest_speed: dict[str, tuple[str, dict]] = {}
    latest_t4: dict[str, tuple[str, dict]] = {}
    for path, doc in newest_first:
        for rec in doc.get("rows", []):
            measured = (any(j.get("status") in ("ok", "oom") for j in rec.get("results", {}).values())
                        or any(a.get("status") in ("ok", "oom") for s in rec.get("search", {}).values()
                               for a in s.get("attempts", [])))
            if not measured:
                continue
            target = latest_t4 if rec.get("kind") == "t4" else latest_speed
            target.setdefault(rec["id"], (run_label(doc, path), rec))
    order = {name: i for i, name in enumerate(ALIASES["all"])}
    lines += ["## Latest measurement of each row", ""]
    if latest_speed:
        lines += speed_table(sorted(latest_speed.values(), key=lambda x: order.get(x[1]["id"], 99)))
    else:
        lines.append("No speed row measured yet.")
    lines += ["", f"### T4 emulation: llama3-8b, fp16, batch 1, allocator capped at {T4_CAP_GIB} GiB, host RAM at "
              f"{T4_HOST_CAP_GB} GB (a memory cgroup; runs before it had no host cap: host figure —), SDPA "
              "memory-efficient backend only; contexts tried 32k, 40k, 48k, ... until each peer's first OOM", ""]
    if latest_t4:
        lines += t4_table(sorted(latest_t4.values(), key=lambda x: order.get(x[1]["id"], 99)))
    else:
        lines.append("Not measured yet.")
    lines += [""] + _export_report().section(list(export_docs))
    lines += ["## Runs (newest first)", ""]
    for path, doc in newest_first:
        label = run_label(doc, path)
        lines += [f"### {label}", "", meta_line(doc), ""]
        speed = [(label, r) for r in doc.get("rows", []) if r.get("kind") != "t4"]
        t4 = [(label, r) for r in doc.get("rows", []) if r.get("kind") == "t4"]
        if speed:
            lines += speed_table(speed) + [""]
        if t4:
            lines += t4_table(t4) + [""]
        notes = []
        for rec in doc.get("rows", []):
            jobs = list(rec.get("results", {}).items()) + [
                (p, a) for p, s in rec.get("search", {}).items() for a in s.get("attempts", [])]
            for peer, job in jobs:
                if job.get("status") in ("error", "timeout", "skipped", "not_reached") and job.get("detail"):
                    notes.append(f"- {rec['id']} · {peer} ({job.get('spec')}): {job['status']}: {job['detail']}")
        if notes:
            lines += ["Notes:", *notes, ""]
    return "\n".join(lines)


def summary_text(doc: dict) -> str:
    """A short plain table for the end of a GPU run's output."""
    out = [f"== models: {meta_line(doc)}"]
    for rec in doc.get("rows", []):
        if rec.get("kind") == "t4":
            for peer, s in rec.get("search", {}).items():
                out.append(f"{rec['id']:<26} {peer:<8} longest {s.get('longest')} (tok/s {s.get('tokens_per_s')}, "
                           f"{s.get('peak_reserved_gib')} GiB, SDPA calls {s.get('sdpa_calls')}), "
                           f"first OOM {s.get('first_oom')}, stopped: {s.get('stopped')}")
            out.append(f"{rec['id']:<26} target ≥48k: {rec.get('target')} · row {rec.get('status')}")
            continue
        cells = "  ".join(f"{p}={fmt_cell(rec['results'].get(p))}" for p in rec.get("results", {}))
        r = rec.get("ratios", {})
        out.append(f"{rec['id']:<26} {cells}  | vs unsloth speed {fmt_ratio(r.get('speed_vs_unsloth'))} "
                   f"mem {fmt_ratio(r.get('memory_vs_unsloth'))} | loss {fmt_check(rec.get('first_loss'))} | {rec.get('status')}")
    return "\n".join(out)


def write_markdown(result_paths: list[str], md_path: str, trainer_paths: list[str] | None = None) -> str:
    """RESULTS.md from these result files, led by the trainer results (``trainer_paths``; by default
    the trainer-*.json files beside the result files)."""
    tr = _trainer_report()
    if trainer_paths is None:
        trainer = tr.trainer_docs_in(sorted({os.path.dirname(p) for p in result_paths}))
    else:
        trainer = tr.load_docs(trainer_paths)
    folders = sorted({os.path.dirname(p) for p in result_paths}) or [RESULTS_DIR]
    text = render_markdown(load_results(result_paths), trainer, _export_report().export_docs_in(folders))
    if md_path:
        with open(md_path, "w") as f:
            f.write(text + "\n")
    return text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        paths = args.from_json or sorted(glob.glob(os.path.join(args.out_dir, "models-*.json")))
        if args.markdown:
            write_markdown(paths, args.markdown)
            print(f"wrote {args.markdown} from {len(paths)} result file(s)")
        if args.summary:
            for path, doc in load_results(paths):
                print(f"# {path}")
                print(summary_text(doc))
        return 0
    try:
        rows = select_rows(args.rows)
        peers = parse_peers(args.peers)
        parse_peers(args.t4_peers)
    except ValueError as exc:
        print(f"models.py: {exc}", file=sys.stderr)
        return 2
    if args.list or args.dry_run:
        contexts = args.t4_contexts.split(",")
        for row in rows:
            if row.kind == "t4":
                t4p = [p for p in peers if p in parse_peers(args.t4_peers)]
                print(f"{row.id:<26} {row.label()}: peers {','.join(t4p)}, contexts {contexts[0]}..{contexts[-1]} "
                      f"until the first OOM (MEM_CAP_GIB={args.t4_cap_gib} NBTUNE_BENCH_SDPA={args.t4_sdpa})")
            else:
                times = f", {args.rounds} rounds (order alternating)" if args.rounds > 1 else ""
                print(f"{row.id:<26} {row.label()}: {','.join(peers)} on {row.spec}{times}")
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    runner = Runner(args, rows, peers)
    doc = runner.run()
    if args.markdown:
        write_markdown(sorted(glob.glob(os.path.join(args.out_dir, "models-*.json"))), args.markdown)
    print(summary_text(doc))
    print(f"# results: {runner.json_path}  log: {runner.log_path}" + (f"  markdown: {args.markdown}" if args.markdown else ""))
    failed = [r["id"] for r in doc["rows"] if r.get("status") == "failed"]
    if failed:
        print(f"# FAILED rows: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
