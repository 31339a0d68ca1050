"""Nothing in the repository shadows Hugging Face's ``kernels`` package.

transformers (``transformers.integrations.hub_kernels``), peft and bitsandbytes import a top-level
``kernels`` when it is installed. A ``kernels/`` folder or ``kernels.py`` on ``sys.path`` (the
repository root, which ``python -c``, pytest and ``PYTHONPATH=$PWD`` put there, or a script's own
folder such as ``benchmarks/``) would be imported in its place and break them. nbtune's Triton
package is ``nbtune.kernels`` and the kernel benchmark is ``benchmarks/kernel_bench.py``.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Folders that land on sys.path when the project is used from a checkout: the root (cwd, pytest's
# rootdir, PYTHONPATH=$PWD) and the folders whose scripts are run directly.
PATH_FOLDERS = [REPO, REPO / "benchmarks", REPO / "benchmarks" / "peers", REPO / "tests", REPO / "notebooks"]


@pytest.mark.parametrize("folder", PATH_FOLDERS, ids=lambda p: str(p.relative_to(REPO)) or ".")
def test_no_top_level_kernels_module_in_folders_on_the_path(folder):
    """No ``kernels.py`` and no ``kernels/`` package in a folder that goes on sys.path. A folder
    without ``__init__.py`` (tests/kernels) is only a namespace portion: Python imports a regular
    package found anywhere on sys.path before it, so it never stands in for Hugging Face's package;
    given an ``__init__.py`` it would (pytest puts tests/ on sys.path for the test packages)."""
    if not folder.is_dir():
        pytest.skip(f"{folder.relative_to(REPO)} is not in this checkout")
    spec = importlib.machinery.PathFinder.find_spec("kernels", [str(folder)])
    if spec is None:
        return
    where = spec.origin or list(spec.submodule_search_locations or [])
    assert spec.origin is None and spec.loader is None, (
        f"{where} would be imported as `kernels` in place of Hugging Face's package: rename it (nbtune's Triton "
        "kernels live in nbtune/kernels; a test folder named kernels must stay without __init__.py)")


def _kernels_installed() -> bool:
    """Hugging Face's package installed (a distribution, not a namespace folder such as tests/kernels)."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("script_folder", [REPO, REPO / "benchmarks"], ids=["root", "benchmarks"])
def test_hub_kernels_import_hugging_faces_package_from_the_repo(script_folder):
    """A Python started in the repository (and one running a benchmark script) imports nbtune, peft,
    trl and transformers' hub-kernel integration, and ``kernels`` is the installed package."""
    if not _kernels_installed():
        pytest.skip("Hugging Face's `kernels` package is not installed in this environment (pip install kernels)")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import nbtune, nbtune.kernels, peft, trl; "
        "import transformers.integrations.hub_kernels as hub; "
        "import kernels; "
        "print(kernels.__file__); print(nbtune.kernels.__file__); print(hub.__name__)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = subprocess.run([sys.executable, "-c", code, str(script_folder)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels_file, nbtune_kernels_file, hub = out.stdout.split()[-3:]
    assert not Path(kernels_file).resolve().is_relative_to(REPO), f"`kernels` was imported from {kernels_file}"
    assert Path(nbtune_kernels_file).resolve().parent == REPO / "nbtune" / "kernels"
    assert hub == "transformers.integrations.hub_kernels"
