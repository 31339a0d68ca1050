"""Facts about a batch that the patched forwards would otherwise read back from the GPU, taken by
the data collator from the batch's host tensors and handed to the forward under a batch key.

``PLAN_KEY`` (attention.py) carries the attention plan. ``TEXT_ONLY_KEY`` carries, for multimodal
Gemma 3, whether the batch is text only: no ``pixel_values``, no image ``token_type_ids`` and no
image token among the ids (where the backbone would have to look for one). The patched
``Gemma3Model`` forward sends such a batch straight to the patched language model (gemma3.py's
``text_only_check`` makes the collator's check for it); deciding that from the GPU tensors costs up
to two device synchronizations per micro-batch (``token_type_ids.any()``; ``(input_ids ==
image_token_id).any()`` for an image token outside the text vocabulary), each of which drains the
queue of launched kernels. On the host the same reads cost microseconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import PLAN_KEY

TEXT_ONLY_KEY = "nbtune_text_only"


def drop_host_facts(kwargs: dict) -> dict:
    """``kwargs`` without the keys the collator added (the plan, the text-only verdict): for a call
    into transformers' own forward, which takes none of them."""
    for key in (PLAN_KEY, TEXT_ONLY_KEY):
        kwargs.pop(key, None)
    return kwargs


@dataclass(frozen=True)
class TextOnlyCheck:
    """The patched multimodal Gemma 3 backbone's "text only" test, run on a collated batch's host
    tensors. ``image_token_id``: the id whose presence sends a batch to transformers' forward (an
    image token outside the text vocabulary, which transformers replaces before the embedding
    lookup); None when the backbone embeds it like any other token (inside the vocabulary)."""

    image_token_id: int | None

    def __call__(self, batch) -> bool | None:
        """The verdict, or None when the ids are not on the CPU (the forward then decides itself)."""
        ids = batch.get("input_ids")
        if not torch.is_tensor(ids) or ids.device.type != "cpu":
            return None
        if batch.get("pixel_values") is not None:
            return False
        types = batch.get("token_type_ids")
        if torch.is_tensor(types):
            if types.device.type != "cpu":
                return None
            if bool(types.any()):
                return False
        return self.image_token_id is None or not bool((ids == self.image_token_id).any())

