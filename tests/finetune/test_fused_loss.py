"""nbtune.train.fused_loss: a patched model trains on its own fused loss, without TRL's per-micro-batch
metrics (gathers and .item()s); an unpatched one keeps TRL's chunked LM head.

Real 4-step runs on the tiny Llama (batch 1 x grad_accum 2): the logged losses equal those of the same
run through TRL's compute_loss, and training calls no gather_for_metrics (the end-of-run evaluation
still gathers its losses).
"""
import traceback

import accelerate
import pytest

import nbtune
from nbtune.train.fused_loss import PatchedModelLoss

from .conftest import tiny_config, train_losses


def _run(tiny_model_dir, tiny_data, out, monkeypatch, trl_loss: bool = False, patch: bool = True):
    metric_gathers = []
    original = accelerate.Accelerator.gather_for_metrics

    def counting(self, *args, **kwargs):
        if not any(frame.name == "evaluation_loop" for frame in traceback.extract_stack()):
            metric_gathers.append(1)  # training only: the end-of-run evaluation gathers its losses
        return original(self, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "gather_for_metrics", counting)
    if trl_loss:
        from trl import SFTTrainer

        monkeypatch.setattr(PatchedModelLoss, "compute_loss", SFTTrainer.compute_loss)
    if not patch:
        monkeypatch.setenv("NBTUNE_PATCH", "0")
    cfg = tiny_config(tiny_model_dir, tiny_data, out, eval_steps=None)
    result = nbtune.finetune(cfg, dashboard=False, progress=False)
    monkeypatch.undo()
    return train_losses(result.metrics), len(metric_gathers)


def test_patched_model_loss_equals_trl_without_per_micro_batch_gathers(tiny_model_dir, tiny_data, tmp_path,
                                                                      monkeypatch):
    ours, our_gathers = _run(tiny_model_dir, tiny_data, tmp_path / "ours", monkeypatch)
    theirs, their_gathers = _run(tiny_model_dir, tiny_data, tmp_path / "trl", monkeypatch, trl_loss=True)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5), step
    assert their_gathers >= 4 * 2 * 3  # TRL: entropy, accuracy and token count per micro-batch
    assert our_gathers == 0


def test_unpatched_model_keeps_trl_loss(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    losses, gathers = _run(tiny_model_dir, tiny_data, tmp_path / "plain", monkeypatch, patch=False)
    assert len(losses) == 4 and gathers >= 4 * 2 * 3
