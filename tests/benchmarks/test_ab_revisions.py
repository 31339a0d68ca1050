"""benchmarks/ab_revisions.py without a GPU: trees built from git revisions, runs that import nbtune
from their tree even where nbtune is installed editable, and the interleaved order of the runs."""
import json
import os
import subprocess
import sys

from bench_scripts import BENCH, REPO, load_script

ab = load_script("nbtune_bench_ab", os.path.join(BENCH, "ab_revisions.py"))


def test_prepare_builds_installed_layout_from_a_revision_and_the_worktree(tmp_path, monkeypatch):
    monkeypatch.setattr(ab, "AB", tmp_path)
    ab.prepare(["head=HEAD", "now=WORKTREE"])
    for name in ("head", "now"):
        tree = tmp_path / name / "nbtune"
        assert (tree / "__init__.py").is_file() and (tree / "kernels" / "lora.py").is_file()
        assert not list(tree.rglob("__pycache__"))
    committed = subprocess.run(["git", "-C", REPO, "show", "HEAD:nbtune/kernels/lora.py"], capture_output=True, text=True,
                               check=True).stdout
    assert (tmp_path / "head" / "nbtune" / "kernels" / "lora.py").read_text() == committed


def test_a_run_imports_nbtune_and_its_kernels_from_its_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(ab, "AB", tmp_path)
    ab.prepare(["t=WORKTREE"])
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "ab_revisions.py"), "_child", str(tmp_path / "t"),
                           "--where"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where = json.loads(proc.stdout.strip().splitlines()[-1])
    for module in ("nbtune", "nbtune.kernels"):
        assert where[module].startswith(str(tmp_path / "t")), where  # not the checkout's editable mapping


def test_runs_alternate_between_trees_and_median_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ab, "AB", tmp_path)
    for name in ("a", "b"):
        (tmp_path / name / "nbtune" / "kernels").mkdir(parents=True)
    order, speeds = [], {"a": iter([100, 300, 200]), "b": iter([10, 30, 20])}

    def fake_run(tree, spec, timeout):  # the subprocess (a GPU run) replaced; the loop is what is tested
        order.append(tree.name)
        return {"tokens_per_s": next(speeds[tree.name]), "peak_reserved_gib": 1.5}

    monkeypatch.setattr(ab, "_one_run", fake_run)
    rows = ab.run("llama2-7b:1:2048:float16", rounds=3, trees=None, timeout=1)
    assert order == ["a", "b"] * 3
    assert [(r["tree"], r["median_tokens_per_s"]) for r in rows] == [("a", 200), ("b", 20)]
    assert "median over 3 round(s)" in capsys.readouterr().out
