"""The training loss of a patched model: its own fused linear + cross-entropy, asked for as
transformers' Trainer asks a model for its loss.

TRL's SFTTrainer (1.16) computes the loss with a chunked LM head of its own and, after every
micro-batch, gathers its entropy / accuracy logs over the ranks and reads them back: device
synchronizations, and under DDP collectives that make the ranks wait for each other. A model nbtune
patched already returns the loss of its fused linear + cross-entropy (logits never built), so
``compute_loss`` here is transformers' Trainer's own: ``model(**inputs, num_items_in_batch=...)``.
Same loss (mean over the target tokens, or over ``num_items_in_batch``, scaled by the number of
processes as the Trainer does); TRL's entropy / accuracy logs are not computed. Models nbtune does
not patch keep TRL's path (its chunked head beats full logits).
"""
from __future__ import annotations


class PatchedModelLoss:
    """Trainer mixin (before TRL's SFTTrainer in the bases): the patched model's own loss."""

    _nbtune_patched = None

    def _model_is_patched(self) -> bool:
        if self._nbtune_patched is None:
            from ..models.patches import is_patched

            self._nbtune_patched = is_patched(self.accelerator.unwrap_model(self.model))
        return self._nbtune_patched

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._model_is_patched():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from transformers import Trainer

        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
