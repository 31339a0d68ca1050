"""Partial offload: ``add_lora(gradient_checkpointing="offload", offload_layers=N)`` keeps the inputs
of the first N decoder layers in host memory and checkpoints the rest plainly; the loss and every
LoRA gradient are those of plain checkpointing on every layer. CPU, with the offload machinery forced
onto CPU tensors (NBTUNE_KERNELS=triton: host copies, pool, prefetch), so that "offloaded" is real."""
from __future__ import annotations

import copy

import pytest
import torch

import nbtune
from nbtune.kernels import offload
from nbtune.kernels.offload import checkpointed_layers, offloaded_checkpoint, offloaded_checkpoint_reference

from tiny_models import lora_grads, randomize_lora_b, tiny_config

LAYERS = 4


def _tiny_llama(seed=0):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = LAYERS
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.normal_(1.0, 0.2)
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


# peft's LoRA layers (fast); once through nbtune's patched layers and kernels (interpreted Triton: slow)
@pytest.mark.parametrize("n, patch", [(0, False), (1, False), (3, False), (LAYERS, False), (2, True)])
def test_first_n_layers_offloaded_rest_plain_same_loss_and_grads(kernel_mode, n, patch):
    kernel_mode("triton")
    base = _tiny_llama(seed=5)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(6))

    plain = nbtune.add_lora(copy.deepcopy(base), r=4, alpha=8, seed=1, gradient_checkpointing="plain", patch=patch)
    randomize_lora_b(plain)
    want_loss, want_grads = _step(plain, ids)

    ours = nbtune.add_lora(copy.deepcopy(base), r=4, alpha=8, seed=1, gradient_checkpointing="offload",
                           offload_layers=n, patch=patch)
    randomize_lora_b(ours)
    layers = checkpointed_layers(ours)
    assert len(layers) == LAYERS and layers == list(ours.get_base_model().model.layers)
    kinds = [layer._gradient_checkpointing_func.func for layer in layers]
    assert kinds == [offloaded_checkpoint] * n + [offloaded_checkpoint_reference] * (LAYERS - n)

    offload.reset_offload_stats()
    loss, grads = _step(ours, ids)
    assert offload.offload_stats()["offloaded"] == n  # one hidden state per offloaded layer, no more
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == want_grads.keys() and grads
    for name in grads:
        assert want_grads[name].abs().sum() > 0, f"{name}: zero gradient (the test would prove nothing)"
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_offload_layers_needs_offload_and_a_count():
    with pytest.raises(ValueError, match="offload_layers=2 needs gradient_checkpointing='offload'"):
        nbtune.add_lora(_tiny_llama(), r=4, gradient_checkpointing="plain", offload_layers=2, patch=False)
    with pytest.raises(ValueError, match="offload_layers must be a whole number"):
        nbtune.add_lora(_tiny_llama(), r=4, gradient_checkpointing="offload", offload_layers=-1, patch=False)
