"""Wrap a loaded model with LoRA adapters (a real peft PeftModel) and set it up for training."""
from __future__ import annotations

import torch

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(
    model,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: str | list[str] = "all-linear",
    bias: str = "none",
    gradient_checkpointing: str | bool = "offload",
    seed: int | None = 3407,
):
    """Add LoRA adapters; returns a ``peft.PeftModel`` in train mode with only the adapters trainable.

    ``gradient_checkpointing``: "offload" (recompute, with saved hidden states in pinned CPU memory
    on a GPU), "plain" (recompute), or "off".
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
        target_modules=targets,
    )
    mode = {True: "plain", False: "off", None: "off"}.get(gradient_checkpointing, gradient_checkpointing)
    if mode not in ("offload", "plain", "off"):
        raise ValueError(f"gradient_checkpointing must be offload, plain or off, not {gradient_checkpointing!r}")
    if mode != "off":
        enable_checkpointing(model, mode)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


def enable_checkpointing(model, mode: str) -> None:
    """Turn on activation checkpointing for a transformers model ("offload" or "plain")."""
    if mode == "offload":
        from nbtune.kernels.offload import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
