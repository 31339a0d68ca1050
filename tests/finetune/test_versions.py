"""nbtune/versions.py, the one place that says the stack's versions, and its three readers:
``nbtune --version``, the ``start`` record of metrics.jsonl and the dry run's report."""
import json
import subprocess
import sys
from importlib import metadata
from types import SimpleNamespace

import pytest

import nbtune
from nbtune import versions

STACK = ("torch", "transformers", "peft", "trl", "bitsandbytes", "triton")


def test_versions_are_the_installed_packages():
    found = versions.stack_versions()
    assert list(found) == ["nbtune", "python", *STACK]
    assert found["nbtune"] == nbtune.__version__
    assert found["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    for name in STACK:
        assert found[name] == metadata.version(name)
    assert versions.stack_line(found) == ", ".join(f"{name} {found[name]}" for name in STACK)


def test_a_missing_package_is_none(monkeypatch):
    real = metadata.version

    def version(name):
        if name in ("bitsandbytes",) + versions.STACK["triton"]:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(versions.metadata, "version", version)
    found = versions.stack_versions()
    assert found["bitsandbytes"] is None and found["triton"] is None and found["torch"] == real("torch")
    assert "bitsandbytes not installed" in versions.stack_line(found)
    assert "  triton        not installed" in versions.version_text()


def test_cli_version_prints_the_stack_without_importing_it():
    code = ("import sys\n"
            "from nbtune.ui.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            f"heavy = [m for m in {STACK!r} if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"nbtune {nbtune.__version__}"
    shown = dict(line.split() for line in lines[1:])
    assert shown == {"python": "{}.{}.{}".format(*sys.version_info[:3]), **{n: metadata.version(n) for n in STACK}}


def test_start_record_carries_the_versions(tmp_path):
    from nbtune.train.metrics import MetricsStream, read_log

    stream = MetricsStream(tmp_path / "metrics.jsonl")
    args = SimpleNamespace(world_size=1, per_device_train_batch_size=2, gradient_accumulation_steps=3)
    stream.on_train_begin(args, SimpleNamespace(max_steps=5), None)
    (start,) = read_log(tmp_path / "metrics.jsonl")
    assert start["event"] == "start" and start["global_batch"] == 6
    assert start["versions"] == versions.stack_versions()
    assert json.loads(json.dumps(start["versions"])) == start["versions"]


@pytest.mark.parametrize("door", ["cli", "python"])
def test_dry_run_names_the_stack(door, tmp_path, capsys, tiny_model_dir, tiny_data):
    import yaml

    from nbtune.ui.cli import main

    from .conftest import tiny_config

    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "out")
    if door == "cli":
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["finetune", str(path), "--dry-run"]) == 0
        out = capsys.readouterr().out
    else:
        out = str(nbtune.finetune(cfg, dry_run=True))
    assert f"  stack: {versions.stack_line()}\n" in out
