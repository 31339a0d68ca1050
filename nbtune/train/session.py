"""The model kept loaded between runs in one Python process (a notebook kernel).

Loading an 8B model takes minutes on Colab, so a run whose config names the same model (same
name, 4-bit choice, dtype and trust_remote_code) as the previous run reuses it: the previous run's
LoRA layers are taken off (peft's ``unload()``, which puts the original modules back without
merging) and its architecture patches and checkpointing undone, so the base is exactly as loaded.
One model is kept at a time: a run that names another model frees the old one first (a T4 holds
one 8B model, not two).

The previous run's ``result.model`` stops being a live adapter once its base is reused; its
``chat()``/``generate()`` then load the saved adapter onto the current base (see ``FinetuneResult``).
"""
from __future__ import annotations

import gc
import sys

_SLOT: dict = {}  # key, model, tokenizer, peft (the PeftModel wrapping it now), generation


def model_key(cfg) -> tuple:
    m = cfg.model
    return (str(m.name), m.load_in_4bit, m.dtype, m.trust_remote_code)


def cached_model_key() -> tuple | None:
    return _SLOT.get("key")


def generation() -> int:
    """Increases each time the cached base model is handed out again (a live adapter is stale
    once its generation is not the current one)."""
    return _SLOT.get("generation", 0)


def get_base_model(cfg, loader, reuse: bool = True):
    """(model, tokenizer, reused): the cached base for this config's model, or a fresh one."""
    key = model_key(cfg)
    if reuse and _SLOT.get("key") == key:
        model = release_adapter()
        model.max_seq_length = cfg.model.max_seq_length
        _SLOT["generation"] = _SLOT.get("generation", 0) + 1
        return model, _SLOT["tokenizer"], True
    clear()
    model, tokenizer = loader()
    if reuse:
        _SLOT.update(key=key, model=model, tokenizer=tokenizer, peft=None,
                     generation=_SLOT.get("generation", 0) + 1)
    return model, tokenizer, False


def attach(peft_model) -> None:
    """Record the PeftModel now wrapping the cached base (so the next run can take it off)."""
    if _SLOT.get("model") is not None and _base_of(peft_model) is _SLOT["model"]:
        _SLOT["peft"] = peft_model


def release_adapter():
    """Take the current LoRA adapter, patches and checkpointing off the cached base; return the base."""
    model, peft_model = _SLOT["model"], _SLOT.get("peft")
    if peft_model is not None:
        try:
            from ..models.patches import unpatch_model

            unpatch_model(peft_model)
        except Exception as e:  # pragma: no cover - patches are another layer's business
            print(f"nbtune: could not unpatch the previous model: {e!r}", file=sys.stderr)
        peft_model.unload()  # original modules back, LoRA weights dropped, nothing merged
        _SLOT["peft"] = None
    for mod in model.modules():
        if hasattr(mod, "peft_config"):
            del mod.peft_config
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    hooks = getattr(model, "_require_grads_hook", None)
    if hooks is not None:
        model.disable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def _base_of(peft_model):
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def clear() -> None:
    """Forget the cached model and free its memory."""
    if not _SLOT:
        return
    generation_ = _SLOT.get("generation", 0)
    _SLOT.clear()
    _SLOT["generation"] = generation_
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass
