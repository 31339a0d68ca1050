"""GPU: the trainer's micro-batches run without a device synchronization.

torch's CUDA sync-debug mode warns at every synchronizing call. Two real runs of the tiny model on
the GPU, 2 optimizer steps each, with 2 and with 6 micro-batches per step: everything but the
micro-batches is the same in both (loading, the optimizer steps, logging, the final evaluation), so
equal counts of synchronizing calls mean the micro-batches add none (TRL's per-micro-batch metrics,
transformers' token count and NaN filter used to add three or more each).
"""
import warnings

import pytest
import torch

import nbtune

from .conftest import tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _synchronizing_calls(config) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            nbtune.finetune(config, dashboard=False, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def test_micro_batches_add_no_synchronization(tiny_model_dir, tiny_data, tmp_path):
    # a first run compiles the Triton kernels (and would count any first-call work)
    nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, tmp_path / "warm-up", max_steps=1,
                                gradient_checkpointing="offload"), dashboard=False, progress=False)
    counts = {accum: _synchronizing_calls(tiny_config(tiny_model_dir, tiny_data, tmp_path / f"accum{accum}",
                                                      max_steps=2, grad_accum=accum, gradient_checkpointing="offload"))
              for accum in (2, 6)}
    assert counts[2] > 0  # the mode is on: loading and the optimizer steps do synchronize
    assert counts[6] == counts[2], counts
