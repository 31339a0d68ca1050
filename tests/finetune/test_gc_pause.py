"""nbtune/train/gc_pause.py: the collector's pauses are timed and a run's train records carry them
(``gc_ms``, ``gc_full``); with NBTUNE_GC_FREEZE=1 the heap is frozen for the training loop only."""
import gc

import pytest

import nbtune
from nbtune.train import session
from nbtune.train.gc_pause import CollectorPauses, freeze_wanted

from .conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _no_frozen_heap_left():
    gc.unfreeze()
    yield
    assert gc.get_freeze_count() == 0, "a test left the collector's heap frozen"
    gc.unfreeze()


def test_freeze_wanted_reads_the_environment(monkeypatch):
    monkeypatch.delenv("NBTUNE_GC_FREEZE", raising=False)
    assert not freeze_wanted()  # off by default: no effect measured
    for off in ("0", "false", "No", " off ", ""):
        monkeypatch.setenv("NBTUNE_GC_FREEZE", off)
        assert not freeze_wanted()
    for on in ("1", "true", " Yes ", "ON"):
        monkeypatch.setenv("NBTUNE_GC_FREEZE", on)
        assert freeze_wanted()


def test_freezes_at_train_begin_times_collections_and_unfreezes_at_the_end():
    pauses = CollectorPauses(freeze=True)
    alive = len(gc.get_objects())
    pauses.on_train_begin(None, None, None)
    try:
        assert pauses.frozen >= gc.get_freeze_count() >= alive // 2  # frozen objects may still die by refcount
        assert len(gc.get_objects()) < alive // 10  # what a full collection walks now
        gc.collect()  # a full collection, as the collector's thresholds would start one
        gc.collect(0)
        fields = pauses.record_fields()
        assert fields["gc_full"] == 1 and fields["gc_ms"] >= 0.0
        assert pauses.record_fields() == dict(gc_ms=0.0, gc_full=0)  # since the previous record only
        assert pauses.total[1] == 2  # and the one the freeze made first (not in any record)
    finally:
        pauses.on_train_end(None, None, None)
    assert gc.get_freeze_count() == 0 and pauses._on_collection not in gc.callbacks
    pauses.close()  # twice is fine
    assert gc.get_freeze_count() == 0


def test_without_the_freeze_it_only_times():
    pauses = CollectorPauses(freeze=False)
    pauses.on_train_begin(None, None, None)
    try:
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert pauses.record_fields()["gc_full"] == 1
    finally:
        pauses.close()


def _freeze_probe(seen):
    def listener(rec):
        if rec.get("event") == "train":
            seen.append((gc.get_freeze_count(), rec.get("gc_ms"), rec.get("gc_full")))
    return listener


@pytest.mark.parametrize("freeze", ["1", "0"])
def test_a_run_freezes_the_heap_while_it_trains_and_logs_the_pauses(tiny_model_dir, tiny_data, tmp_path, monkeypatch,
                                                                    freeze):
    session.clear()
    monkeypatch.setenv("NBTUNE_GC_FREEZE", freeze)
    seen = []
    result = nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, tmp_path / "run"), dashboard=False,
                             progress=False, listeners=[_freeze_probe(seen)])
    assert seen and all(isinstance(ms, float) and full >= 0 for _, ms, full in seen)
    assert all((count > 0) == (freeze == "1") for count, _, _ in seen)
    train = [r for r in result.metrics if r.get("event") == "train"]
    assert all("gc_ms" in r and "gc_full" in r for r in train)
    assert gc.get_freeze_count() == 0  # unfrozen when training ended


def test_an_interrupted_run_unfreezes_the_heap_too(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    session.clear()
    monkeypatch.setenv("NBTUNE_GC_FREEZE", "1")

    def raise_at_2(rec):
        if rec.get("event") == "train" and rec.get("step") == 2:
            assert gc.get_freeze_count() > 0
            raise KeyboardInterrupt

    result = nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, tmp_path / "run"), dashboard=False,
                             progress=False, listeners=[raise_at_2])
    assert result.interrupted and gc.get_freeze_count() == 0
