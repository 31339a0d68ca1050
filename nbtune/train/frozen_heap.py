"""Python's cyclic garbage collector while training: the heap built before the run is frozen.

A full (generation 2) collection walks every object the collector tracks. After importing torch,
transformers and TRL, loading a model and tokenizing a dataset there are millions of them, and a
full collection takes hundreds of milliseconds of host time (a 3-step CPU run of the test model:
3 full collections, 820 ms in all; benchmarks/ddp_profile.py reports them per rank). The
collector starts one whenever enough objects have survived, which in a training loop is at a
random micro-batch: the host, which issues the GPU's work, stalls that long, and under data
parallelism the stalled rank makes every rank wait for it at the next all-reduce.

``gc.freeze()`` moves every object alive at the start of training into a permanent generation
the collector no longer walks; objects made during training are collected as before. On exit
the heap is unfrozen (unless it was frozen before, by the user or a library: then it stays as
found), so garbage among the frozen objects is collected later as usual. ``NBTUNE_GC_FREEZE=0``
turns this off (to compare).
"""
from __future__ import annotations

import contextlib
import gc
import os


def enabled() -> bool:
    return os.environ.get("NBTUNE_GC_FREEZE", "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def frozen_heap():
    """Freeze the objects alive now for the duration of the block (see the module's docstring)."""
    if not enabled() or not gc.isenabled():
        yield
        return
    frozen_before = gc.get_freeze_count() > 0
    gc.collect()  # what is garbage already is freed now, not kept for the whole run
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()
