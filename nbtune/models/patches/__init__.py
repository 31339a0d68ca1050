"""Per-architecture patches: transformers modules' forwards swapped for nbtune.kernels.

    from nbtune.models.patches import patch_model, unpatch_model
    patch_model(model)      # a PreTrainedModel or a peft PeftModel; True when patched
    unpatch_model(model)    # transformers' forwards back (A/B tests)

Registry: ``model_type`` -> :class:`~.family.Family` (one small file per family: llama.py covers
Llama 2/3.x, Mistral and Qwen2/2.5; qwen3.py, gemma.py, gemma2.py, gemma3.py (``gemma3_text`` and
the text part of ``gemma3``), phi3.py). Any other model type keeps transformers' forwards, with a
warning that names it and the supported list: it still trains (LoRA through peft, checkpointing as
configured), just without the kernels.

``add_lora`` patches after peft has wrapped the model, so the patched attention and MLP see peft's
LoRA layers and run them through the fused kernels (``common.lora_projection`` says when). Turn
patching off with ``NBTUNE_PATCH=0`` in the environment, ``load_model(..., patch=False)`` or
``add_lora(..., patch=False)``.
"""
from __future__ import annotations

import warnings

from nbtune._env import PATCH_ENV, env_flag

from . import gemma, gemma2, gemma3, llama, phi3, qwen3
from .attention import AttentionPlan, attend, build_plan
from .common import lora_projection, patch_on, uninstall
from .family import Family

REGISTRY: dict[str, Family] = {
    model_type: family
    for module in (llama, qwen3, gemma, gemma2, gemma3, phi3)
    for family in module.FAMILIES
    for model_type in family.model_types
}
SUPPORTED_MODEL_TYPES = tuple(REGISTRY)


def patching_enabled(patch: bool | None = None) -> bool:
    """``patch`` if given, else the ``NBTUNE_PATCH`` environment variable (default on)."""
    if patch is not None:
        return bool(patch)
    return env_flag(PATCH_ENV, default=True)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_type_of(model) -> str:
    return getattr(_base(model).config, "model_type", type(_base(model)).__name__)


def family_of(model) -> Family | None:
    return REGISTRY.get(model_type_of(model))


def patch_model(model, patch: bool | None = None, warn: bool = True) -> bool:
    """Patch ``model`` (transformers model or peft PeftModel) in place; True when it now runs the
    nbtune forwards. Idempotent. False (and a warning naming the model type and the supported
    list) for an architecture without a patch; False silently when patching is turned off."""
    if not patching_enabled(patch):
        return False
    base = _base(model)
    model_type = model_type_of(model)
    family = REGISTRY.get(model_type)
    reason = None if family is None else family.unsupported_reason(base.config)
    if family is None or reason is not None:
        if warn:
            why = "has no nbtune patch" if family is None else f"is patched by nbtune except with {reason}"
            warnings.warn(
                f"nbtune: model type {model_type!r} {why}; it runs on the plain transformers path (correct, "
                f"but slower and with more memory). Patched model types: {', '.join(SUPPORTED_MODEL_TYPES)}.",
                UserWarning, stacklevel=2,
            )
        return False
    switch_off_hub_kernels(base)
    family.apply(base)
    base.nbtune_patched = family.name
    return True


def switch_off_hub_kernels(model) -> bool:
    """Turn transformers' Hugging Face hub kernels off on ``model`` (True if they were on).

    With the ``kernels`` package installed, transformers 5.25 kernelizes every ``from_pretrained``
    model by default and re-kernelizes it on each ``train()``/``eval()`` switch: RMSNorm (and RoPE)
    modules get the hub kernel's forward or, where none applies, their class forward back, popped
    from the instance. Either way nbtune's patched forwards on those modules vanish at the trainer's
    first mode switch and the fused kernels silently stop running. nbtune's patches replace exactly
    those layers, so the hub kernels are reset to transformers' own forwards (before the patches go
    on) and kept off."""
    if not getattr(model, "use_kernels", False):
        return False
    model.use_kernels = False  # transformers' reset_kernels(): torch forwards back, no re-kernelizing
    return True


def unpatch_model(model) -> int:
    """Give every patched module its transformers forward back; returns how many were patched."""
    base = _base(model)
    count = sum(uninstall(module) for module in base.modules())
    if hasattr(base, "nbtune_patched"):
        del base.nbtune_patched
    return count


def is_patched(model) -> bool:
    return any(patch_on(m) for m in _base(model).modules())


__all__ = [
    "AttentionPlan", "Family", "PATCH_ENV", "REGISTRY", "SUPPORTED_MODEL_TYPES", "attend", "build_plan",
    "family_of", "is_patched", "lora_projection", "patch_model", "patching_enabled", "switch_off_hub_kernels",
    "unpatch_model",
]
