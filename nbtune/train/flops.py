"""The floating-point operations of a micro-batch, with the model's parameter count taken once.

transformers' Trainer adds ``6 * tokens * model.num_parameters(exclude_embeddings=True)`` to
``current_flos`` after every micro-batch. ``num_parameters`` walks every module (to find the
embeddings) and every parameter each time: ~6 ms of host time per micro-batch for llama3-8b with
LoRA on the seven projections (2,665 modules, 739 parameter tensors; measured on a CPU), spent
between two micro-batches while the GPU waits for the host to queue the next one. The parameters of a
model do not change while it trains (only their values do), so the count is taken once per model;
the figure is transformers' own.
"""
from __future__ import annotations


class ParameterCountOnce:
    """Trainer mixin: ``floating_point_ops`` as transformers computes it, ``num_parameters`` cached."""

    _nbtune_parameter_count = None  # (model, count)

    def floating_point_ops(self, inputs) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        cached = self._nbtune_parameter_count
        if cached is None or cached[0] is not self.model:
            cached = self._nbtune_parameter_count = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * cached[1]
