"""Wrap a loaded model with LoRA adapters (a real peft PeftModel) and set it up for training.

After peft has wrapped the model, the architecture patches (``nbtune.models.patches``) are
installed, so the patched attention and MLP forwards see peft's LoRA layers and run them through
the fused kernels of ``nbtune.kernels.lora``; the result is still an ordinary ``PeftModel``
(``save_pretrained``, ``merge_and_unload``, ``disable_adapter()`` and adapters loaded anywhere work
as usual; whatever the fused path does not cover runs through peft's own layers).

LoRA parameter dtype: fp32, whatever the base dtype (peft's ``autocast_adapter_dtype`` default,
enforced here by :func:`trainable_to_fp32`, and again by nbtune's trainer once TRL has cast them).
On fp16 models this is required: the Trainer's fp16 loss scaling refuses fp16 trainable parameters
("Attempting to unscale FP16 gradients") and bf16 ones (its unscale kernel has no bf16), and fp32
master weights keep small updates from rounding away. The kernels cast A and B to the compute dtype for each matmul and
return their gradients in fp32. The adapters of an 8B model at r=16 weigh ~160 MiB in fp32.
"""
from __future__ import annotations

import functools

import torch

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Multimodal Gemma 3: "all-linear" would also put adapters on the vision tower; LoRA the language model only.
GEMMA3_LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def resolve_targets(model, targets):
    """``targets`` as peft's ``target_modules``: "all-linear" stays peft's shorthand (every linear
    layer but the LM head) except on multimodal Gemma 3, where it means the language model's
    projections only."""
    if isinstance(targets, str) and targets.lower() == "all-linear":
        if getattr(model.config, "model_type", None) == "gemma3":
            return GEMMA3_LANGUAGE_TARGETS
    return targets


def linear_module_names(model) -> list[str]:
    """The distinct names (last part) of ``model``'s linear layers, in model order: what a list of
    LoRA targets names (full-precision, bitsandbytes 4/8-bit and GPT-2's Conv1D layers)."""
    names = []
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            short = full.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names


def check_targets(model, targets) -> None:
    """A :class:`~nbtune.models.loader.ModelLoadError` naming the model's linear layers when
    ``targets`` (lora.targets) names a module the model does not have: every name of a list must
    match a module (as peft matches: the name, or its last dotted parts); a single text other than
    "all-linear" is a regular expression that must match some module's full name."""
    import re

    from .loader import ModelLoadError

    if isinstance(targets, str) and targets.lower() == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        try:
            unmatched = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
        except re.error as e:
            raise ModelLoadError(f"lora.targets: {targets!r} is not a valid regular expression ({e}); give a list "
                                 "of module names (e.g. [q_proj, v_proj]) or 'all-linear'") from None
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        linear = linear_module_names(model)
        raise ModelLoadError(
            f"lora.targets: {', '.join(repr(t) for t in unmatched)} "
            + ("matches" if len(unmatched) == 1 else "match") + f" no module of this model ({kind}). Its linear "
            f"layers: {', '.join(linear)}. Give some of them (e.g. lora.targets: [{', '.join(linear[:2])}]) or "
            "'all-linear' (every linear layer but the LM head)")


def check_targets_of_folder(folder, targets) -> None:
    """:func:`check_targets` for the checkpoint in ``folder`` before it is loaded: the model is built
    from its config.json on the meta device (no weights read, no memory used). Custom-code models
    (whose config needs trust_remote_code) are left to :func:`add_lora`'s check after loading."""
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture transformers cannot build here: checked once loaded
        return
    check_targets(model, targets)


def add_lora(
    model,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: str | list[str] = "all-linear",
    bias: str = "none",
    gradient_checkpointing: str | bool = "offload",
    seed: int | None = 3407,
    patch: bool | None = None,
    offload_layers: int | None = None,
):
    """Add LoRA adapters; returns a ``peft.PeftModel`` in train mode with only the adapters trainable.

    ``gradient_checkpointing``: "offload" (recompute, with saved hidden states in pinned CPU memory
    on a GPU), "plain" (recompute), or "off". ``offload_layers``: with "offload", only the first N
    decoder layers keep their input in host memory and the rest are checkpointed plainly on the GPU
    (what gradient checkpointing "auto" asks for when the host's RAM cannot hold every layer's input;
    None: all layers). ``patch``: install nbtune's architecture patches
    (None: what ``load_model(patch=...)`` recorded, else on unless ``NBTUNE_PATCH=0``). Dropout > 0
    keeps LoRA correct but runs those layers through peft instead of the fused kernels.
    """
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise ValueError(f"lora.r must be a positive integer, got {r}")
    if seed is not None:
        torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, task_type="CAUSAL_LM",
        target_modules=resolve_targets(model, targets),
    )
    check_targets(model, targets)  # a clear message, not peft's error, for a name the model lacks
    mode = {True: "plain", False: "off", None: "off"}.get(gradient_checkpointing, gradient_checkpointing)
    if mode not in ("offload", "plain", "off"):
        hint = (" ('auto' is the config's value: nbtune.finetune resolves it, see nbtune.planner.choose_checkpointing)"
                if mode == "auto" else "")
        raise ValueError(f"gradient_checkpointing must be offload, plain or off, not {gradient_checkpointing!r}{hint}")
    if offload_layers is not None and mode != "offload":
        raise ValueError(f"offload_layers={offload_layers!r} needs gradient_checkpointing='offload' (got {mode!r}); "
                         "leave offload_layers at None for the other modes")
    if mode != "off":
        enable_checkpointing(model, mode, offload_layers=offload_layers)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    trainable_to_fp32(peft_model)
    _patch_if_enabled(peft_model, patch)
    peft_model.train()
    return peft_model


def trainable_to_fp32(model) -> int:
    """Cast every trainable fp16/bf16 parameter of ``model`` to fp32 in place (the same Parameter
    objects, so whatever holds them sees the change); returns how many were cast.

    ``add_lora`` calls it, and so does nbtune's trainer after TRL's ``SFTTrainer.__init__``, which
    casts the trainable parameters of a 4-bit/8-bit model to bf16 whatever the run's precision
    (TRL's QLoRA recipe): bf16 gradients break fp16 loss scaling, and bf16 adapters lose small updates."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            cast += 1
    return cast


def enable_checkpointing(model, mode: str, offload_layers: int | None = None) -> None:
    """Turn on activation checkpointing for a transformers model ("offload" or "plain"; with "offload",
    ``offload_layers`` offloads only the first N decoder layers' inputs, the rest plain)."""
    if mode == "offload":
        from nbtune.kernels.offload import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model, offload_layers=offload_layers)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    # torch's non-reentrant checkpoint, through nbtune's wrapper so that kernels see the checkpoint
    # phase (the fused MLP skips its work in the recompute); nothing is offloaded
    from nbtune.kernels.offload import offloaded_checkpoint_reference, use_checkpoint_function

    use_checkpoint_function(model, functools.partial(offloaded_checkpoint_reference, use_reentrant=False))


def load_adapter(model, adapter_dir, is_trainable: bool = False, patch: bool | None = None):
    """Load a saved LoRA adapter (peft format, e.g. a run's ``adapter/``) onto a loaded base model;
    returns the ``peft.PeftModel`` (frozen unless ``is_trainable``), patched like ``add_lora`` does."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    _patch_if_enabled(peft_model, patch)
    return peft_model


def _patch_if_enabled(peft_model, patch: bool | None) -> None:
    """Install the architecture patches on a freshly wrapped PeftModel unless switched off
    (``patch`` None: what ``load_model(patch=...)`` recorded on the base model, else NBTUNE_PATCH)."""
    from .patches import patch_model, patching_enabled

    if patch is None:
        patch = getattr(peft_model.get_base_model(), "nbtune_patch", None)
    if patching_enabled(patch):
        patch_model(peft_model)
