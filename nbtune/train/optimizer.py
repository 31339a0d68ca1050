"""bitsandbytes' optimizers (AdamW 8-bit by default) without a device synchronization per parameter.

bitsandbytes' ``Optimizer8bit.step`` runs each parameter's update kernel and then calls
``torch.cuda.synchronize()``, parameter after parameter: 448 full-device waits per step for
LoRA on all seven projections of a 32-layer model. Each wait drains the GPU's queue, so the host
cannot issue the next update until the previous one has finished, and in data-parallel runs the
wait also stalls whatever collective is in flight. The waits are there for paged states (unified
memory the host may touch); for ordinary device tensors every kernel runs on the current stream,
in order, and nothing on the host reads the states, so they buy nothing.

``sync_free(cls)`` gives a subclass of a bitsandbytes optimizer class whose ``step`` is the same
loop (same kernels, same state layout, same ``state_dict``: checkpoints load either way) without
those waits; paged optimizers keep bitsandbytes' own ``step``. ``register_embedding_overrides``
repeats what transformers' Trainer does for bitsandbytes 8-bit optimizers: trainable embeddings
keep 32-bit states.
"""
from __future__ import annotations

import functools

import torch


def _is_bnb_optimizer(cls) -> bool:
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except Exception:  # bitsandbytes missing or broken: nothing to replace
        return False
    return isinstance(cls, type) and issubclass(cls, Optimizer8bit)


def _step(self, closure=None):
    """One optimizer step: bitsandbytes' ``Optimizer8bit.step`` without the synchronization after
    each parameter (kept for paged states, which the host may touch)."""
    if self.is_paged:
        return super(type(self), self).step(closure)
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not self.initialized:
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
    for gindex, group in enumerate(self.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if len(self.state[p]) == 0:
                self.init_state(group, p, gindex, pindex)
            self.update_step(group, p, gindex, pindex)
    return loss


@functools.lru_cache(maxsize=None)
def sync_free(cls):
    """``cls`` (a bitsandbytes optimizer class) with the per-parameter synchronization removed from
    its step; any other class is returned unchanged."""
    if not _is_bnb_optimizer(cls):
        return cls
    return type(f"SyncFree{cls.__name__}", (cls,), {
        "__module__": __name__,
        "__doc__": f"bitsandbytes' {cls.__name__}, stepping without a device synchronization per parameter.",
        "step": torch.no_grad()(_step),
    })


def register_embedding_overrides(model, optimizer) -> int:
    """Trainable ``nn.Embedding`` weights get 32-bit optimizer states under an 8-bit bitsandbytes
    optimizer (what transformers' Trainer registers for its own bitsandbytes optimizers). Returns
    how many embeddings were registered."""
    if not _is_bnb_optimizer(type(optimizer)):
        return 0
    from bitsandbytes.optim import GlobalOptimManager

    manager = GlobalOptimManager.get_instance()
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad:
            manager.register_module_override(module, "weight", {"optim_bits": 32})
            count += 1
    return count
