"""nbtune at several git revisions, one benchmark row, interleaved runs on one GPU: which change moved it?

    python benchmarks/ab_revisions.py prepare REV [REV ...]        # here: ab/<name>/nbtune from git
    python benchmarks/ab_revisions.py run SPEC [--rounds N]        # GPU machine: every tree in ab/
    python benchmarks/ab_revisions.py run llama2-7b:1:2048:float16 --rounds 2 --trees base,head

``prepare`` writes each revision's ``nbtune/`` package under ``ab/<name>/``, named ``NAME=REV`` or by
the revision; ``ab/`` is git-ignored: copy it to the GPU machine with the checkout. The
working tree itself (uncommitted changes included) is prepared as ``WORKTREE``.

``run`` runs benchmarks/nbtune_peer.py (the models rows' loop: 3 warm-up + 8 timed steps, median)
once per tree per round, the trees in turn (A B C A B C ...), so that a drift of the host during
the call hits every tree alike; it prints each run's line and a table of the median over rounds.
``python benchmarks/ab_revisions.py _child ab/<name> --where`` shows what a run would import.
The hosts' noise is large (the same code has measured 3,892 to 5,071 tok/s in one call): use
several rounds and read differences under ~10% as noise.

Each run imports nbtune from its tree alone: the child puts the tree first on ``sys.path``, drops
setuptools' editable finders (gpu_suite.sh installs nbtune editable, and its finder would map
``nbtune`` to the checkout), and checks where nbtune and
nbtune.kernels came from: a run that imported them from elsewhere fails instead of measuring the
wrong code.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AB = REPO / "ab"
PEER = REPO / "benchmarks" / "nbtune_peer.py"


def _tree_name(arg: str) -> tuple[str, str]:
    name, _, rev = arg.partition("=")
    return (name, rev) if rev else (arg.replace("/", "_").replace("~", "-").replace("^", "-"), arg)


def _unpack(rev: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "tree.tar"
        subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), rev, "nbtune"], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        _assemble(Path(tmp), dest)


def _assemble(src: Path, dest: Path) -> None:
    """``src/nbtune`` (the kernels inside it at ``nbtune/kernels``) -> ``dest/nbtune``."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src / "nbtune", dest / "nbtune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def prepare(revs: list[str]) -> None:
    AB.mkdir(exist_ok=True)
    for arg in revs:
        name, rev = _tree_name(arg)
        if rev == "WORKTREE":
            _assemble(REPO, AB / name)
        else:
            _unpack(rev, AB / name)
        print(f"ab/{name}: {rev}")


def _child(tree: str, argv: list[str]) -> None:
    """In the run's own process: nbtune from ``tree`` only, then nbtune_peer.py as ``__main__``."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "").lower()]
    sys.path_importer_cache.clear()
    sys.path.insert(0, tree)
    import nbtune
    import nbtune.kernels

    for module in (nbtune, nbtune.kernels):
        if not Path(module.__file__).resolve().is_relative_to(Path(tree).resolve()):
            raise SystemExit(f"{module.__name__} came from {module.__file__}, not from {tree}")
    if argv == ["--where"]:  # what a run would import, and nothing else
        print(json.dumps({m.__name__: m.__file__ for m in (nbtune, nbtune.kernels)}))
        return
    sys.argv = [str(PEER), *argv]
    runpy.run_path(str(PEER), run_name="__main__")


def _one_run(tree: Path, spec: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(tree), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"rc={proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def run(spec: str, rounds: int, trees: list[str] | None, timeout: float) -> list[dict]:
    names = trees or sorted(p.name for p in AB.iterdir() if (p / "nbtune" / "kernels").is_dir())
    if not names:
        raise SystemExit("no trees under ab/: run `prepare` first (and copy ab/ to the GPU machine)")
    results = {name: [] for name in names}
    for r in range(rounds):
        for name in names:
            res = _one_run(AB / name, spec, timeout)
            results[name].append(res)
            shown = res.get("error") or f"{res.get('tokens_per_s')} tok/s · {res.get('peak_reserved_gib')} GiB"
            print(f"round {r + 1} {name:<16} {shown}", flush=True)
    rows = []
    print(f"\n{spec}: median over {rounds} round(s)")
    print(f"{'tree':<16} {'tok/s':>8} {'min':>8} {'max':>8} {'GiB':>6}")
    for name in names:
        ok = [x for x in results[name] if "error" not in x]
        if not ok:
            print(f"{name:<16} {'failed':>8}")
            rows.append(dict(tree=name, runs=results[name]))
            continue
        speeds = [x["tokens_per_s"] for x in ok]
        gib = max(x["peak_reserved_gib"] for x in ok)
        print(f"{name:<16} {statistics.median(speeds):>8,.0f} {min(speeds):>8,} {max(speeds):>8,} {gib:>6.2f}")
        rows.append(dict(tree=name, median_tokens_per_s=statistics.median(speeds), peak_reserved_gib=gib,
                         runs=results[name]))
    return rows


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return _child(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write ab/<name>/nbtune for each revision (NAME=REV, or WORKTREE)")
    p.add_argument("revs", nargs="+")
    r = sub.add_parser("run", help="run one row for every tree under ab/, interleaved")
    r.add_argument("spec", help="shape:batch:seq:dtype, e.g. llama2-7b:1:2048:float16")
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument("--trees", default=None, help="comma-separated names under ab/ (default: all)")
    r.add_argument("--timeout", type=float, default=240, help="seconds per run")
    r.add_argument("--out", default=None, help="write the runs and medians here as JSON")
    args = ap.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.revs)
    rows = run(args.spec, args.rounds, args.trees.split(",") if args.trees else None, args.timeout)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(spec=args.spec, rounds=args.rounds, trees=rows), indent=1))


if __name__ == "__main__":
    main()
