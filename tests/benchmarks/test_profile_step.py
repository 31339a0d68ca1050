"""benchmarks/profile_step.py: its host report's cProfile names files relative to the repository
(an installed package's relative to its install folder), not by the machine's absolute paths. The
step profiled here is a real CPU one (the script's GPU step needs CUDA)."""
import cProfile
import os
import sys

from bench_scripts import BENCH, REPO, load_script


def _profile_step():
    saved = list(sys.path)
    try:
        return load_script("nbtune_bench_profile_step", os.path.join(BENCH, "profile_step.py"))
    finally:
        sys.path[:] = saved  # the script puts benchmarks/ first on sys.path: not for the other tests


def test_cprofile_text_has_repo_relative_paths():
    import torch

    from nbtune.train.config import build_config

    profile_step = _profile_step()
    prof = cProfile.Profile()
    prof.enable()
    build_config(train={"max_steps": 3})
    torch.nn.functional.silu(torch.ones(8))  # a Python function of an installed package
    prof.disable()
    text = profile_step.cprofile_text(prof, top=400)
    assert "nbtune/train/config.py:" in text and "torch/nn/functional.py:" in text, text
    assert REPO + os.sep not in text and os.sep + "site-packages" + os.sep not in text
