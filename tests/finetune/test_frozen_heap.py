"""The heap alive before training is frozen while it trains (nbtune/train/frozen_heap.py): the
collector's full collections skip it, garbage made during training is still collected, and the
collector is left as it was found."""
import gc
import weakref

import pytest

import nbtune
from nbtune.train.frozen_heap import frozen_heap

from .conftest import tiny_config


class _Node:
    pass


@pytest.fixture(autouse=True)
def _unfrozen():
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


def test_objects_alive_at_the_start_are_frozen_and_unfrozen_after():
    alive = [_Node() for _ in range(100)]
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() >= len(alive)
    assert gc.get_freeze_count() == 0


def test_cycles_made_while_frozen_are_still_collected():
    with frozen_heap():
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a reference cycle: only the collector frees it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None


def test_a_heap_frozen_before_stays_frozen(monkeypatch):
    gc.freeze()
    before = gc.get_freeze_count()
    with frozen_heap():
        pass
    assert gc.get_freeze_count() >= before > 0


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("NBTUNE_GC_FREEZE", "0")
    with frozen_heap():
        assert gc.get_freeze_count() == 0


def test_a_finetune_trains_on_a_frozen_heap_and_leaves_it_unfrozen(tiny_model_dir, tiny_data, tmp_path):
    seen = []
    nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, tmp_path / "out", max_steps=2),
                    listeners=[lambda record: seen.append((record.get("event"), gc.get_freeze_count()))],
                    dashboard=False, progress=False)
    during = [count for event, count in seen if event == "train"]
    assert during and all(count > 10_000 for count in during), seen  # the loaded model, torch, transformers...
    assert gc.get_freeze_count() == 0
