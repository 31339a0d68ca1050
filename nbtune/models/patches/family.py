"""What a family patch is: which transformers classes get which patched forward, with which options.

A family file (llama.py, gemma2.py, ...) is one :class:`Family` value: the class-name prefix of its
transformers modules and the handful of switches in which it differs from Llama. :meth:`Family.apply`
walks the model's modules and installs the shared forwards of ``common`` on every instance whose
class it names (by name, so a transformers release without one of these models still imports).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from . import common


def window_from_module(module):
    """Qwen2/3, Gemma 2/3: each attention module knows its own window (None on full layers)."""
    return getattr(module, "sliding_window", None)


def window_from_config(module):
    """Mistral, Phi-3: one window for every layer, from the config (None: none)."""
    return getattr(module.config, "sliding_window", None)


def no_window(module):
    return None


def no_final_softcap(model):
    return None


def final_softcap_from_config(model):
    return getattr(model.config, "final_logit_softcapping", None)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple
    prefix: str  # transformers class-name prefix: "Llama" -> LlamaRMSNorm, LlamaAttention, ...
    norm_offset: float = 0.0  # Gemma: (1 + w)
    activation_key: str = "hidden_act"  # config attribute naming the MLP activation
    qk_norm: bool = False  # Qwen3, Gemma 3
    fused_qkv: bool = False  # Phi-3
    fused_gate_up: bool = False  # Phi-3
    post_mlp_norm: bool = False  # Gemma 2/3: a norm after the MLP saves its output (no checkpointed-tail MLP)
    attn_softcap: bool = False  # Gemma 2: config.attn_logit_softcapping
    window: Callable = no_window
    passes_window: bool = False  # whether transformers passes sliding_window= to its attention function
    rope_per_layer_type: bool = False  # Gemma 3
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size) (see Family.apply)
    final_softcap: Callable = no_final_softcap
    text_model_names: tuple = ()  # decoder-stack classes besides f"{prefix}Model"
    causal_lm_names: tuple = ()  # LM-head classes besides f"{prefix}ForCausalLM"
    extra: dict = field(default_factory=dict)  # class name -> (forward, options) for anything else

    def unsupported_reason(self, config) -> str | None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "use_bidirectional_attention", False) or getattr(text, "is_causal", True) is False:
            return "bidirectional attention"
        return None

    def apply(self, model: nn.Module) -> int:
        """Install the patched forwards on every matching module of ``model``; returns how many."""
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        activation = common.ACTIVATIONS.get(getattr(text, self.activation_key, None))
        p = self.prefix
        installed = 0
        for module in model.modules():
            name = type(module).__name__
            if name == f"{p}RMSNorm":
                installed += common.install(module, common.norm_forward, offset=self.norm_offset)
            elif name == f"{p}Attention":
                softcap = getattr(module.config, "attn_logit_softcapping", None) if self.attn_softcap else None
                installed += common.install(
                    module, common.attention_forward, fused_qkv=self.fused_qkv, qk_norm=self.qk_norm,
                    softcap=softcap, window=self.window, passes_window=self.passes_window,
                    eager_attention=sys.modules[type(module).__module__].eager_attention_forward,
                )
            elif name == f"{p}MLP" and activation is not None:
                installed += common.install(module, common.mlp_forward, activation=activation,
                                            fused_gate_up=self.fused_gate_up, output_summed=not self.post_mlp_norm)
            elif name == f"{p}Model" and name not in self.extra or name in self.text_model_names:
                # Gemma's embedding scale: a module of its own (GemmaTextScaledWordEmbedding; Gemma 1 and 2
                # from transformers 5.4, Gemma 3 in every 5.x) that the patched forward calls as it is, or,
                # in releases without it, a product in transformers' model forward, which the patched one makes
                scaled_module = hasattr(sys.modules[type(module).__module__], f"{p}TextScaledWordEmbedding")
                installed += common.install(module, common.model_forward, rope_per_layer_type=self.rope_per_layer_type,
                                            scale_embeddings=self.embed_scale and not scaled_module)
            elif name == f"{p}ForCausalLM" or name in self.causal_lm_names:
                from transformers.modeling_outputs import CausalLMOutputWithPast

                installed += common.install(module, common.causal_lm_forward, backbone="model",
                                            final_softcap=self.final_softcap, output_class=CausalLMOutputWithPast)
            elif name in self.extra:
                forward, options = self.extra[name]
                installed += common.install(module, forward, **options(module))
        return installed
