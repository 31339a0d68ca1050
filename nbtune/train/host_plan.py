"""Attention plans built on the host, by the data collator, for the patched model's forward.

The patched forward of a model nbtune supports attends through an ``AttentionPlan`` (no padding,
right padding or padding-free packing: nbtune/models/patches/attention.py). Built inside the
forward, the plan reads the attention mask and the position ids back from the GPU: up to four
device synchronizations per micro-batch (a padded batch has both, and TRL's collator always sends
position ids). Each one drains the queue of launched kernels, so the host can no longer run ahead
of the GPU. The collator's batch is still on the host: the same reads there cost a few
microseconds and no synchronization. The plan travels with the batch (the trainer and accelerate
move tensors to the GPU and pass other objects through) and the forward takes it when it fits
the rows.
"""
from __future__ import annotations

from collections.abc import MutableMapping

from ..models.patches.attention import plan_batch
from ..models.patches.host_facts import TEXT_ONLY_KEY


class HostPlannedCollator:
    """A data collator whose batches carry their attention plan (``PLAN_KEY``), built on the host,
    and, given a multimodal model's ``text_only_check``, whether they are text only
    (``TEXT_ONLY_KEY``: nbtune/models/patches/host_facts.py)."""

    def __init__(self, collator, text_only_check=None):
        self.collator = collator
        self.text_only_check = text_only_check

    def __call__(self, features):
        batch = self.collator(features)
        if not isinstance(batch, MutableMapping):
            return batch
        if self.text_only_check is not None:
            verdict = self.text_only_check(batch)
            if verdict is not None:
                batch[TEXT_ONLY_KEY] = verdict
        return plan_batch(batch)

    def __getattr__(self, name):  # the wrapped collator's own attributes (TRL reads some)
        if name in ("collator", "text_only_check"):
            raise AttributeError(name)
        return getattr(self.collator, name)
