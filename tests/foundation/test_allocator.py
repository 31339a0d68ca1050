"""``import nbtune`` asks torch's CUDA allocator for expandable segments (nbtune/_allocator.py),
unless the user configured the allocator or opted out; importing nbtune still imports no torch."""
import json
import os
import subprocess
import sys

import pytest

from nbtune import _allocator

PROBE = ("import json, os, sys; import nbtune; "
         "print(json.dumps({k: os.environ.get(k) for k in ('PYTORCH_ALLOC_CONF', 'PYTORCH_CUDA_ALLOC_CONF')} "
         "| {'torch_imported': 'torch' in sys.modules}))")


def _import_nbtune(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", _allocator.ENV)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sets_expandable_segments_without_importing_torch():
    seen = _import_nbtune()
    name = "PYTORCH_ALLOC_CONF" if _allocator._torch_reads_unified_variable() else "PYTORCH_CUDA_ALLOC_CONF"
    assert seen[name] == "expandable_segments:True"
    assert seen["torch_imported"] is False


@pytest.mark.parametrize("variable", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_user_allocator_settings_win(variable):
    seen = _import_nbtune(**{variable: "max_split_size_mb:128"})
    assert seen[variable] == "max_split_size_mb:128"
    other = ({"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} - {variable}).pop()
    assert seen[other] is None


def test_opt_out_keeps_torch_default():
    seen = _import_nbtune(NBTUNE_ALLOCATOR="default")
    assert seen["PYTORCH_ALLOC_CONF"] is None and seen["PYTORCH_CUDA_ALLOC_CONF"] is None


def test_configure_allocator_on_a_given_environment(monkeypatch):
    monkeypatch.setattr(_allocator, "_unsupported_platform", lambda: False)
    env = {}
    applied = _allocator.configure_allocator(env)
    assert env == {applied: "expandable_segments:True"}
    assert _allocator.configure_allocator({"PYTORCH_CUDA_ALLOC_CONF": ""}) is not None  # empty = unset
    monkeypatch.setattr(_allocator, "_unsupported_platform", lambda: True)
    env = {}
    assert _allocator.configure_allocator(env) is None and env == {}


def test_cuda_already_in_use_gets_the_setting_at_run_time(monkeypatch):
    """torch imported and CUDA initialised before nbtune: the environment is too late, so the setting
    goes through torch's allocator-settings call (which applies to the segments made from then on)."""
    import torch

    monkeypatch.setattr(_allocator, "_unsupported_platform", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    env = {}
    assert _allocator.configure_allocator(env) == "runtime"
    assert calls == ["expandable_segments:True"] and env == {}
