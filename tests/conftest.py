"""Test set-up shared by every test.

On a machine without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be
set before any ``@triton.jit`` function is defined, so it is set here, before nbtune is imported.
GPU tests carry the ``gpu`` marker and are skipped where CUDA is absent.
"""
import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Never reach a hub from the tests: models and data come from local paths or shipped packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_mode(monkeypatch):
    """Set NBTUNE_KERNELS for one test: ``kernel_mode("triton")``."""

    def set_mode(mode: str):
        monkeypatch.setenv("NBTUNE_KERNELS", mode)

    return set_mode
