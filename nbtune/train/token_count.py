"""The count of input tokens seen, kept on the device between logging steps.

transformers' Trainer counts the non-padding input tokens of every micro-batch and adds
``accelerator.gather(count).sum().item()`` to ``state.num_input_tokens_seen`` right after the
micro-batch's backward is queued. That ``.item()`` is a device synchronization per micro-batch:
the host waits for the whole backward to finish before it may queue the next forward, so the GPU
idles while the host prepares the next batch; under DDP the gather is also a rendezvous of all
ranks per micro-batch. nbtune reads the count only when it logs (tokens/s on the dashboard), so
here the per-micro-batch counts are summed on the device and folded into the state, gathered over
the ranks, when the Trainer logs or saves a checkpoint: one synchronization per logging step,
which the loss logged at that step costs anyway. The numbers are transformers' own (same count,
same rule for padding), only read later.
"""
from __future__ import annotations

import torch


def count_input_tokens(inputs, mode: str, main_input_name: str, pad_token_id) -> torch.Tensor | int | None:
    """The tokens of one micro-batch as transformers counts them: ``mode`` "non_padding" (the
    attention mask's sum, else the input ids that are not padding, else all) or "all"."""
    if main_input_name not in inputs:
        return None
    ids = inputs[main_input_name]
    if mode == "non_padding":
        if "attention_mask" in inputs:
            return inputs["attention_mask"].sum()
        if pad_token_id is not None:
            return (ids != pad_token_id).sum()
    return ids.numel()


class TokensSeenOnDevice:
    """Trainer mixin: ``state.num_input_tokens_seen`` as transformers keeps it, without a device
    synchronization (and, under DDP, a collective) per micro-batch."""

    _nbtune_pending_tokens = None

    def _track_num_input_tokens(self, inputs):
        mode = self.args.include_num_input_tokens_seen
        if mode in ("no", False, None):
            return
        mode = "non_padding" if mode == "non_padding" else "all"
        pad = getattr(self.processing_class, "pad_token_id", None)
        count = count_input_tokens(inputs, mode, getattr(self.model, "main_input_name", "input_ids"), pad)
        if count is None:
            return super()._track_num_input_tokens(inputs)  # transformers warns about the missing input
        count = torch.as_tensor(count, device=self.args.device, dtype=torch.int64)
        pending = self._nbtune_pending_tokens
        self._nbtune_pending_tokens = count if pending is None else pending + count

    def fold_tokens_seen(self) -> None:
        """Add the counts held on the device to ``state.num_input_tokens_seen`` (all ranks: a gather)."""
        pending, self._nbtune_pending_tokens = self._nbtune_pending_tokens, None
        if pending is not None:
            self.state.num_input_tokens_seen += int(self.accelerator.gather(pending).sum().item())

    def log(self, logs, *args, **kwargs):
        self.fold_tokens_seen()
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        self.fold_tokens_seen()  # the saved trainer state carries the count
        return super()._save_checkpoint(*args, **kwargs)
