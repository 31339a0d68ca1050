"""nbtune/train/gc_pause.py: the collector's pauses are timed and a run's train records carry them
(``gc_ms``, ``gc_full``)."""
import gc

import pytest

import nbtune
from nbtune.train import session
from nbtune.train.gc_pause import CollectorPauses

from .conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def test_times_collections_between_train_begin_and_end():
    pauses = CollectorPauses()
    pauses.on_train_begin(None, None, None)
    try:
        gc.collect()  # a full collection, as the collector's thresholds would start one
        gc.collect(0)
        fields = pauses.record_fields()
        assert fields["gc_full"] == 1 and fields["gc_ms"] >= 0.0
        assert pauses.record_fields() == dict(gc_ms=0.0, gc_full=0)  # since the previous record only
        assert pauses.total[1] == 1
    finally:
        pauses.on_train_end(None, None, None)
    assert pauses._on_collection not in gc.callbacks
    gc.collect()
    assert pauses.total[1] == 1  # no longer timing
    pauses.close()  # twice is fine


def _pause_probe(seen):
    def listener(rec):
        if rec.get("event") == "train":
            seen.append((rec.get("gc_ms"), rec.get("gc_full")))
    return listener


def test_a_run_logs_the_pauses(tiny_model_dir, tiny_data, tmp_path):
    session.clear()
    seen = []
    result = nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, tmp_path / "run"), dashboard=False,
                             progress=False, listeners=[_pause_probe(seen)])
    assert seen and all(isinstance(ms, float) and full >= 0 for ms, full in seen)
    train = [r for r in result.metrics if r.get("event") == "train"]
    assert all("gc_ms" in r and "gc_full" in r for r in train)
