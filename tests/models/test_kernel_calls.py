"""Per training step, every fused path of a patched tiny Llama runs exactly as often as it should.

A dependency release can switch a fused path off without changing any number: the model still
trains through transformers' or peft's own code, only slower and with more memory (transformers
5.23 checkpointing ``partial(forward, layer)``, which hid the layer from the checkpointed-tail
MLP; 5.25's hub kernels popping the patched RMSNorm forwards). This test counts the calls of the
kernels' public entry points, as the patched forwards make them, by checkpoint phase: "forward"
(a checkpointed layer's first run), "recompute" (its rerun inside the backward) and "outside"
(no checkpointed layer), for a 2-layer Llama with LoRA on every projection, under the Triton
kernels (Triton's interpreter on CPU), with each checkpointing mode that recomputes.
"""
from __future__ import annotations

import collections

import pytest
import torch
from tiny_models import random_batch, tiny_model

import nbtune
from nbtune.kernels import lora as lora_kernels
from nbtune.kernels.offload import checkpoint_phase
from nbtune.models.patches import common

LAYERS = 2  # tiny_models: 2 decoder layers
# entry point (as common.py calls it) -> {phase: calls per step}; per layer and pass: 2 RMSNorms,
# one RoPE, one fused QKV, one attention, one o_proj LoRA linear, one fused MLP. Outside the
# layers: the final norm, the attention plan and the fused loss.
PER_LAYER_PASS = {"rms_norm": 2, "apply_rope": 1, "lora_qkv": 1, "attend": 1, "lora_linear": 1, "lora_mlp": 1}
EXPECTED = {
    name: {"forward": LAYERS * n, "recompute": LAYERS * n} for name, n in PER_LAYER_PASS.items()
}
EXPECTED["rms_norm"]["outside"] = 1
EXPECTED["build_plan"] = {"outside": 1}
EXPECTED["fused_linear_cross_entropy"] = {"outside": 1}
EXPECTED["swiglu"] = {}  # the unfused MLP's activation: never, every MLP is fused


def _phase_name() -> str:
    phase = checkpoint_phase()
    return "outside" if phase is None else phase.name


@pytest.fixture
def spies(monkeypatch):
    """Counters of common.<entry point> calls by phase, the owners of every checkpoint phase seen,
    the ``checkpointed_tail`` flags given to lora_mlp, and the GLU forwards inside the fused MLP."""
    calls = collections.defaultdict(collections.Counter)
    owners, tails, glu_forwards = set(), collections.Counter(), collections.Counter()

    def spy(name, original):
        def counted(*args, **kwargs):
            calls[name][_phase_name()] += 1
            phase = checkpoint_phase()
            if phase is not None:
                owners.add(phase.owner)
            if name == "lora_mlp":
                tails[kwargs.get("checkpointed_tail", False)] += 1
            return original(*args, **kwargs)

        return counted

    for name in EXPECTED:
        monkeypatch.setattr(common, name, spy(name, getattr(common, name)))
    glu_forward = lora_kernels.glu_forward_2d

    def counted_glu(*args, **kwargs):
        glu_forwards[_phase_name()] += 1
        return glu_forward(*args, **kwargs)

    monkeypatch.setattr(lora_kernels, "glu_forward_2d", counted_glu)
    return calls, owners, tails, glu_forwards


@pytest.mark.parametrize("checkpointing", ["offload", "plain"])
def test_each_fused_path_runs_its_count_per_step(checkpointing, kernel_mode, spies):
    kernel_mode("triton")
    calls, owners, tails, glu_forwards = spies
    model = nbtune.add_lora(tiny_model("llama"), r=4, alpha=8, gradient_checkpointing=checkpointing)
    base = model.get_base_model()
    layers = set(base.model.layers)
    assert model.training and base.is_gradient_checkpointing
    ids, labels = random_batch()
    for step in range(2):
        model.eval()  # a trainer's evaluation between steps: nothing may take a patch off on the switch
        model.train()
        for counter in (calls, owners, tails, glu_forwards):
            counter.clear()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        assert torch.isfinite(loss)
        got = {name: dict(calls[name]) for name in EXPECTED}
        assert got == EXPECTED, f"step {step}: kernel calls by phase differ from what every fused path gives"
        # each checkpointed run belongs to a decoder layer (the phase knows its owner) ...
        assert owners == layers
        # ... so every MLP is the layer's checkpointed tail, and the recompute runs none of it
        assert tails == {True: 2 * LAYERS}
        assert glu_forwards["recompute"] == 0 and glu_forwards["forward"] >= LAYERS
        model.zero_grad(set_to_none=True)
