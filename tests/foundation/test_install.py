"""The distribution ships nbtune and nbtune.kernels (nbtune/kernels/), editable and as a wheel."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_editable_or_source_install_imports_kernels():
    import nbtune
    import nbtune.kernels as k

    assert Path(k.__file__).resolve().parent == REPO / "nbtune" / "kernels"
    assert k.kernel_mode() in ("auto", "reference", "triton")
    assert callable(k.rms_norm) and callable(k.fused_linear_cross_entropy)
    assert nbtune.__version__


def test_wheel_install_ships_kernels(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheel_dir), str(REPO)], check=True, timeout=300)
    wheels = list(wheel_dir.glob("nbtune-*.whl"))
    assert len(wheels) == 1
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheels[0])], check=True, timeout=300)
    assert (target / "nbtune" / "kernels" / "rms_norm.py").is_file()
    for init in (REPO / "nbtune").rglob("__init__.py"):  # every subpackage is listed in pyproject
        assert (target / init.relative_to(REPO)).is_file(), f"{init.parent.name} missing from the wheel"
    code = ("import nbtune.kernels as k, nbtune.models, nbtune.train, nbtune.ui.cli; "
            "print(k.__file__); print(k.rms_norm.__module__)")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    kernel_file, module = out.stdout.split()
    assert Path(kernel_file).resolve().is_relative_to(target.resolve())
    assert module == "nbtune.kernels.rms_norm"


def test_console_command_and_module_entry_point():
    for cmd in (["nbtune", "--help"], [sys.executable, "-m", "nbtune", "--help"]):
        exe = Path(sys.executable).parent / cmd[0] if cmd[0] == "nbtune" else None
        if exe is not None:
            cmd = [str(exe)] + cmd[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for sub in ("demo", "pull", "finetune"):
            assert sub in out.stdout
