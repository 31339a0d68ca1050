"""What llama.cpp needs to know about each architecture nbtune exports to GGUF.

For every supported ``architectures[0]`` of a transformers config: the GGUF architecture, the
hyper-parameters written as ``<arch>.*`` metadata, how a checkpoint tensor name maps to its GGUF
name (through the ``gguf`` package's ``TensorNameMap``), and the value changes llama.cpp expects:

- Llama / Mistral: the query and key rows are permuted from transformers' rotate-half RoPE layout
  (first half / second half of each head) to llama.cpp's interleaved pairs: per head,
  ``W.reshape(n_head, 2, head_dim / 2, in).swapaxes(1, 2)``;
- Gemma 1/2/3: every RMSNorm weight ``w`` becomes ``w + 1`` (transformers computes
  ``x * (1 + w)``, llama.cpp ``x * w``), and ``lm_head`` is the tied embedding;
- Phi-3: long-context RoPE factors become ``rope_factors_long/short`` tensors;
- Llama 3 RoPE scaling becomes the ``rope_freqs`` tensor.

Other architectures are refused with a message naming the supported ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter import ExportError

SUPPORTED = {
    "LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2", "Qwen3ForCausalLM": "QWEN3",
    "GemmaForCausalLM": "GEMMA", "Gemma2ForCausalLM": "GEMMA2",
    "Gemma3ForCausalLM": "GEMMA3", "Gemma3ForConditionalGeneration": "GEMMA3",
    "Phi3ForCausalLM": "PHI3",
}
MULTIMODAL_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


@dataclass
class Extra:
    """A tensor llama.cpp needs that the checkpoint does not hold (RoPE factors)."""

    gguf_name: str
    value: torch.Tensor


@dataclass
class ArchSpec:
    hf_arch: str
    gguf_arch: object  # gguf.MODEL_ARCH
    hparams: dict  # the text model's config (a multimodal config's text_config merged in)
    extras: list[Extra] = field(default_factory=list)
    transform: Callable | None = None  # (hf_name, rows fp32, row offset) -> rows

    @property
    def arch_name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def n_head(self) -> int:
        return self.hparams["num_attention_heads"]

    @property
    def n_head_kv(self) -> int:
        return self.hparams.get("num_key_value_heads") or self.n_head

    @property
    def head_dim(self) -> int:
        return self.hparams.get("head_dim") or self.hparams["hidden_size"] // self.n_head

    def row_align(self, hf_name: str) -> int:
        """Row blocks of q/k weights that get permuted must hold whole heads."""
        if self.gguf_arch_key == "LLAMA" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            return self.head_dim
        return 1

    @property
    def gguf_arch_key(self) -> str:
        return SUPPORTED[self.hf_arch]


def text_name(name: str) -> str | None:
    """The checkpoint name of a text-model tensor, or None for a tensor llama.cpp's text model
    does not use (vision tower, projector, rotary caches)."""
    if name.startswith(MULTIMODAL_PREFIXES) or name.endswith(".rotary_emb.inv_freq"):
        return None
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return name


def arch_spec(config: dict) -> ArchSpec:
    """The :class:`ArchSpec` of a transformers config dict; unsupported architectures raise."""
    import gguf

    archs = config.get("architectures") or []
    hf_arch = archs[0] if archs else None
    if hf_arch not in SUPPORTED:
        raise ExportError(
            f"GGUF export: architecture {hf_arch or config.get('model_type')!r} is not supported by nbtune's GGUF "
            f"writer; supported: {', '.join(sorted(SUPPORTED))}. The merged safetensors export (format 'merged') works "
            "for any model; convert that folder with llama.cpp's convert_hf_to_gguf.py if llama.cpp supports it")
    hparams = dict(config)
    if isinstance(config.get("text_config"), dict):
        hparams = {**config, **config["text_config"]}
    spec = ArchSpec(hf_arch, getattr(gguf.MODEL_ARCH, SUPPORTED[hf_arch]), hparams)
    key = SUPPORTED[hf_arch]
    if key == "LLAMA":
        spec.transform = _llama_permute(spec)
    elif key.startswith("GEMMA"):
        spec.transform = _gemma_norm_shift
    _rope_extras(spec)
    return spec


def rope_parameters(hparams: dict) -> dict:
    """transformers >= 5 ``rope_parameters`` (per layer type for Gemma 3) or the older ``rope_scaling``
    + ``rope_theta``, as one dict of the full-attention layers' RoPE."""
    rope = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    rope = dict(rope.get("full_attention", rope))
    if "rope_theta" not in rope and hparams.get("rope_theta") is not None:
        rope["rope_theta"] = hparams["rope_theta"]
    if "rope_type" not in rope and rope.get("type"):
        rope["rope_type"] = rope["type"]
    return rope


def sliding_rope_theta(hparams: dict) -> float | None:
    rope = hparams.get("rope_parameters") or {}
    if isinstance(rope.get("sliding_attention"), dict):
        return rope["sliding_attention"].get("rope_theta")
    return hparams.get("rope_local_base_freq")


def _llama_permute(spec: ArchSpec):
    def transform(name: str, rows: torch.Tensor, start: int) -> torch.Tensor:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            rows = rows.reshape(-1, 2, spec.head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
        return rows
    return transform


def _gemma_norm_shift(name: str, rows: torch.Tensor, start: int) -> torch.Tensor:
    return rows + 1 if name.endswith("norm.weight") else rows


def _rope_extras(spec: ArchSpec) -> None:
    import gguf

    rope = rope_parameters(spec.hparams)
    kind = (rope.get("rope_type") or "default").lower()
    if kind == "llama3":
        base = rope.get("rope_theta", 10000.0)
        dim = spec.head_dim
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old_ctx = rope.get("original_max_position_embeddings", 8192)
        factors = []
        for f in freqs.tolist():  # Llama 3.1's frequency-dependent scaling, as a divisor per frequency
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high:
                factors.append(1.0)
            elif wavelen > old_ctx / low:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        spec.extras.append(Extra(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                 torch.tensor(factors, dtype=torch.float32)))
    elif kind in ("longrope", "su") and spec.gguf_arch_key == "PHI3":
        rot = rope.get("partial_rotary_factor", spec.hparams.get("partial_rotary_factor", 1.0))
        dims = int(rot * spec.head_dim)
        long_f, short_f = rope.get("long_factor"), rope.get("short_factor")
        if not long_f or not short_f or len(long_f) != dims // 2 or len(short_f) != dims // 2:
            raise ExportError(f"GGUF export: the Phi-3 longrope factors must be 2 lists of {dims // 2} numbers "
                              "(config rope_scaling.long_factor / short_factor)")
        spec.extras += [Extra(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight",
                              torch.tensor(long_f, dtype=torch.float32)),
                        Extra(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight",
                              torch.tensor(short_f, dtype=torch.float32))]
    elif kind not in ("default", "linear", "yarn"):
        raise ExportError(f"GGUF export: RoPE scaling {kind!r} of this {spec.hf_arch} is not one nbtune writes to GGUF "
                          "(default, linear, yarn, llama3, and longrope for Phi-3 are)")


def write_hparams(writer, spec: ArchSpec) -> None:
    """The ``<arch>.*`` hyper-parameters llama.cpp reads for this architecture."""
    import gguf

    h, key = spec.hparams, spec.gguf_arch_key
    writer.add_block_count(h["num_hidden_layers"])
    writer.add_context_length(h.get("max_position_embeddings", 8192 if key != "GEMMA3" else 131072))
    writer.add_embedding_length(h["hidden_size"])
    writer.add_feed_forward_length(h["intermediate_size"])
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_layer_norm_rms_eps(h.get("rms_norm_eps", 1e-6))
    rope = rope_parameters(h)
    if h.get("head_dim") is not None or key.startswith("GEMMA") or key == "QWEN3":
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = (rope.get("rope_type") or "default").lower()
    if kind == "linear" and rope.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn" and rope.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if key == "LLAMA":
        writer.add_vocab_size(h["vocab_size"])
        writer.add_rope_dimension_count(spec.head_dim)
    elif key == "GEMMA2":
        writer.add_attn_logit_softcapping(float(h.get("attn_logit_softcapping") or 0.0))
        writer.add_final_logit_softcapping(float(h.get("final_logit_softcapping") or 0.0))
        writer.add_sliding_window(int(h["sliding_window"]))
    elif key == "GEMMA3":
        if h.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(h["final_logit_softcapping"]))
        if h.get("sliding_window") and h.get("sliding_window_pattern") != 1:
            writer.add_sliding_window(int(h["sliding_window"]))
        if (local := sliding_rope_theta(h)) is not None:
            writer.add_rope_freq_base_swa(float(local))
        if "rope_theta" not in rope:
            writer.add_rope_freq_base(1_000_000.0)
    elif key == "PHI3":
        rot = rope.get("partial_rotary_factor", h.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(int(rot * spec.head_dim))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                 or h.get("original_max_position_embeddings")
                                                 or h.get("max_position_embeddings", 4096)))
        writer.add_sliding_window(int(h.get("sliding_window") or 0))
        if kind in ("longrope", "su"):
            ctx, orig = h["max_position_embeddings"], rope.get("original_max_position_embeddings")
            scale = ctx / orig
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)


def gguf_tensor_name(spec: ArchSpec, name: str, tensor_map) -> str | None:
    """The GGUF name of checkpoint tensor ``name`` (None: not written, e.g. Gemma's tied lm_head)."""
    name = text_name(name)
    if name is None:
        return None
    if spec.gguf_arch_key.startswith("GEMMA") and name == "lm_head.weight":
        return None  # Gemma ties the output to the embedding; llama.cpp reuses token_embd
    mapped = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ExportError(f"GGUF export: tensor {name!r} of this {spec.hf_arch} has no llama.cpp name; nbtune's GGUF "
                          "writer does not know this variant of the architecture")
    return mapped
