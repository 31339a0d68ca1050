"""The trainable parameters, listed once per run: gradients cleared and clipped over them only.

After every optimizer step transformers' loop calls ``model.zero_grad()``, and its gradient
clipping takes ``model.parameters()``: each walks every module and parameter of the model (2,665
modules and 739 tensors for llama3-8b with LoRA on the seven projections: 9-18 ms of host time per
step on a CPU) to reach the 448 LoRA weights that have a gradient, while the GPU waits for the
next step to be queued. Autograd gives a gradient only to tensors that require one, and which
parameters do is settled before training starts, so the list of those, taken once when the
trainer has prepared the model, reaches every gradient there is. Clearing and clipping run over
that list; the values are the same as over the whole model.
"""
from __future__ import annotations

import torch


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters of ``model`` that require a gradient, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def zero_grads(params, set_to_none: bool = True) -> None:
    """``Module.zero_grad`` over these parameters only (the same steps, in torch's order)."""
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


class _TrainableZeroGrad:
    """Stands in for a model's ``zero_grad`` while it trains (an instance attribute, removed after)."""

    def __init__(self, params):
        self.params = params

    def __call__(self, set_to_none: bool = True) -> None:
        zero_grads(self.params, set_to_none)


class TrainableOnly:
    """Trainer mixin: ``model.zero_grad()`` and gradient clipping over the trainable parameters,
    listed once when training starts (see the module docstring). Sharded or compiled set-ups
    (FSDP, DeepSpeed, XLA, mixed device meshes) keep transformers' own clipping."""

    _nbtune_trainable = None  # the list, during train()
    _nbtune_zeroed = None  # the model whose zero_grad stands in, during train()

    def _prepare_for_training(self, *args, **kwargs):
        model, dataloader = super()._prepare_for_training(*args, **kwargs)
        self._nbtune_trainable = trainable_parameters(model)
        if isinstance(model, torch.nn.Module):
            model.zero_grad(set_to_none=True)  # every module once: no stale gradient anywhere
            model.zero_grad = _TrainableZeroGrad(self._nbtune_trainable)
            self._nbtune_zeroed = model
        return model, dataloader

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            model, self._nbtune_zeroed, self._nbtune_trainable = self._nbtune_zeroed, None, None
            if model is not None and isinstance(model.__dict__.get("zero_grad"), _TrainableZeroGrad):
                del model.zero_grad

    def _plain_clipping(self, model) -> bool:
        """Whether accelerate clips a plain list of tensors here (no sharding, one device mesh)."""
        from accelerate.utils import DistributedType

        if self._nbtune_trainable is None:
            return False
        if self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
            return False
        from transformers.utils import is_sagemaker_mp_enabled

        if is_sagemaker_mp_enabled():
            return False
        mixed = getattr(self, "_has_mixed_mesh_grads", None)
        return not (mixed is not None and mixed(model))

    def _clip_grad_norm(self, model):
        """transformers' clipping (the pre-clip norm returned), over the listed parameters."""
        if not self._plain_clipping(model):
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._nbtune_trainable, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        """Without clipping (``max_grad_norm`` 0) transformers measures the norm over every
        parameter; here over the listed ones (the same value)."""
        if grad_norm is None and self._plain_clipping(model):
            grad_norm = self.accelerator.clip_grad_norm_(self._nbtune_trainable, float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)
