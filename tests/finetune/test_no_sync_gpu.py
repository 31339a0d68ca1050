"""GPU: the trainer's micro-batches run without a device synchronization.

torch's CUDA sync-debug mode warns at every synchronizing call. Two real runs of the word model
(tests/conftest.py: no hub, no embedded model) in 4-bit with offloaded checkpointing and 8-bit AdamW
on the GPU, 2 optimizer steps each, with 2 and with 6 micro-batches per step: everything but the
micro-batches is the same in both (loading, the optimizer steps, logging, the final evaluation), so
no line of code synchronizing more often in the second run means the micro-batches add none (TRL's
per-micro-batch metrics, transformers' token count and NaN filter, the attention plan read from the
GPU and blocking batch copies each used to add some).
"""
import collections
import warnings

import pytest
import torch

import nbtune


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _synchronizing_calls(config) -> collections.Counter:
    """Synchronizing calls of one run, counted per Python line that made them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            nbtune.finetune(config, dashboard=False, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


def _config(word_model, out, **train) -> dict:
    model_dir, data = word_model
    return {
        "model": {"name": str(model_dir), "max_seq_length": 128, "load_in_4bit": True},
        "data": {"source": str(data), "format": "text", "responses_only": False, "eval_split": None},
        "lora": {"r": 8, "alpha": 16},
        "train": {"batch_size": 2, "lr": 5e-3, "warmup_steps": 0, "optimizer": "adamw_8bit",
                  "gradient_checkpointing": "offload", "seed": 1, **train},
        "output": {"dir": str(out)},
    }


def test_micro_batches_add_no_synchronization(word_model, tmp_path):
    # a first run compiles the Triton kernels (and would count any first-call work)
    nbtune.finetune(_config(word_model, tmp_path / "warm-up", max_steps=1, grad_accum=2),
                    dashboard=False, progress=False)
    counts = {accum: _synchronizing_calls(_config(word_model, tmp_path / f"accum{accum}", max_steps=2,
                                                  grad_accum=accum))
              for accum in (2, 6)}
    assert counts[2].total() > 0  # the mode is on: loading and the optimizer steps do synchronize
    # no line synchronizes more often with 6 micro-batches per step than with 2 (a line may sync once
    # more or less between two runs, e.g. where the pinned-memory pool first grows: not per micro-batch)
    added = counts[6] - counts[2]
    assert not added, (counts[2].total(), counts[6].total(), dict(added))
