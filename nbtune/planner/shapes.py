"""Model shapes: the handful of numbers that decide a model's training memory.

A :class:`ModelShape` comes from one of three places, tried in this order by :func:`resolve_shape`:

1. a local checkpoint directory (or a path to its ``config.json``);
2. the built-in catalog (``CATALOG``), by name or by a hub id that names a catalogued model
   (``meta-llama/Llama-3.1-8B-Instruct``, ``unsloth/llama-3-8b-bnb-4bit``, ...), so the common
   models need no network;
3. the hub: ``config.json`` of a hub id, fetched with ``huggingface_hub`` when it is installed
   and online.

Multimodal configs (Gemma 3, Llava, Mllama, ...) keep the language model's numbers in
``text_config``; the vision tower is counted as extra 16-bit parameters. Pure Python: no torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any


class PlannerError(ValueError):
    """The planner cannot answer as asked; the message says why and what to give instead."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that its training memory depends on."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    max_positions: int
    model_type: str = "llama"  # the transformers model_type (decides module names and config class)
    hub_id: str | None = None  # where the weights live (what a %%finetune config should name)
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    gated_mlp: bool = True  # gate/up/down (SwiGLU, GeGLU) vs up/down
    norms_per_layer: int = 2  # RMSNorm/LayerNorm weights per decoder layer (Gemma 2/3: 4)
    qk_norm: bool = False  # per-head q/k norms (Qwen3, Gemma 3)
    num_experts: int = 0  # MoE: experts per layer (0 = dense MLP)
    experts_per_token: int = 0
    logit_softcap: float | None = None  # Gemma 2's final_logit_softcapping
    sliding_window: int | None = None  # local-attention layers' window (needs an explicit mask)
    vision_params: int = 0  # parameters outside the language model (vision tower, projector)
    prequantized: bool = False  # the checkpoint already holds bitsandbytes 4-bit weights

    # ------------------------------------------------------------------ derived sizes
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_modules(self) -> list[tuple[str, int, int, int]]:
        """``(name, in_features, out_features, copies)`` of each linear layer in ONE decoder layer,
        named as transformers names the modules (what LoRA ``target_modules`` match)."""
        h, i = self.hidden_size, self.intermediate_size
        experts = max(self.num_experts, 1)
        if self.model_type == "phi3":  # fused projections
            attn = [("qkv_proj", h, self.q_dim + 2 * self.kv_dim, 1), ("o_proj", self.q_dim, h, 1)]
            mlp = [("gate_up_proj", h, 2 * i, 1), ("down_proj", i, h, 1)]
            return attn + mlp
        attn = [("q_proj", h, self.q_dim, 1), ("k_proj", h, self.kv_dim, 1), ("v_proj", h, self.kv_dim, 1),
                ("o_proj", self.q_dim, h, 1)]
        if self.gated_mlp:
            mlp = [("gate_proj", h, i, experts), ("up_proj", h, i, experts), ("down_proj", i, h, experts)]
        else:
            mlp = [("up_proj", h, i, experts), ("down_proj", i, h, experts)]
        return attn + mlp

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear layers (what 4-bit quantizes)."""
        return self.num_layers * sum(a * b * n for _, a, b, n in self.linear_modules())

    @property
    def linear_tensors(self) -> int:
        return self.num_layers * sum(n for *_, n in self.linear_modules())

    @property
    def largest_linear(self) -> int:
        return max(a * b for _, a, b, _ in self.linear_modules())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def other_params(self) -> int:
        """Norm weights, attention biases, router weights: small tensors kept in 16-bit."""
        n = (self.norms_per_layer * self.num_layers + 1) * self.hidden_size
        if self.qk_norm:
            n += 2 * self.num_layers * self.head_dim
        if self.attention_bias:
            n += self.num_layers * (self.q_dim + 2 * self.kv_dim)
        if self.num_experts:
            n += self.num_layers * self.hidden_size * self.num_experts
        return n

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params + self.vision_params

    def lora_params(self, rank: int, targets="all-linear") -> int:
        """LoRA A (r x in) and B (out x r) parameters over the matching linear layers."""
        return self.num_layers * sum(rank * (a + b) * n for _, a, b, n in self.lora_targets(targets))

    def lora_targets(self, targets="all-linear") -> list[tuple[str, int, int, int]]:
        """The linear modules that ``targets`` (peft's ``target_modules``) selects."""
        modules = self.linear_modules()
        if targets is None or targets in ("all-linear", "all_linear", "all"):
            return modules
        names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
        chosen = []
        for module in modules:
            for t in names:
                if module[0] == t or module[0].endswith("." + t) or (
                    isinstance(targets, str) and len(names) == 1 and _regex_matches(t, module[0])
                ):
                    chosen.append(module)
                    break
        if not chosen:
            raise PlannerError(
                f"lora targets {targets!r} match no linear layer of {self.name}; its layers are: "
                + ", ".join(m[0] for m in modules)
            )
        return chosen

    def describe(self) -> str:
        b = self.total_params / 1e9
        size = f"{b:.1f}B" if b >= 1 else f"{self.total_params / 1e6:.0f}M"
        return (f"{self.name} ({size} params: {self.num_layers} layers, hidden {self.hidden_size}, "
                f"MLP {self.intermediate_size}, {self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}, "
                f"vocab {self.vocab_size}{', tied' if self.tie_embeddings else ''})")

    def to_hf_config(self) -> dict:
        """Keyword arguments for ``transformers.AutoConfig.for_model`` that rebuild this shape
        (used by calibration to make random-weight checkpoints)."""
        cfg: dict[str, Any] = dict(
            model_type=self.model_type, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_embeddings, max_position_embeddings=self.max_positions,
        )
        if self.head_dim != self.hidden_size // self.num_heads or self.model_type in ("qwen3", "gemma2", "gemma3_text"):
            cfg["head_dim"] = self.head_dim
        if self.model_type == "llama" and self.attention_bias:
            cfg["attention_bias"] = True
        return cfg


def _regex_matches(pattern: str, name: str) -> bool:
    if not any(c in pattern for c in "*.^$|()[]+?"):
        return False
    try:
        return re.fullmatch(pattern, name) is not None or re.search(pattern, name) is not None
    except re.error:
        return False


def _shape(name, h, i, layers, heads, kv, vocab, tied, max_pos, *, head_dim=None, **kw) -> ModelShape:
    return ModelShape(name=name, hidden_size=h, intermediate_size=i, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv, head_dim=head_dim or h // heads, vocab_size=vocab, tie_embeddings=tied,
                      max_positions=max_pos, **kw)


# Real dimensions, as in each model's config.json on the hub.
CATALOG: dict[str, ModelShape] = {s.name: s for s in [
    _shape("llama-2-7b", 4096, 11008, 32, 32, 32, 32000, False, 4096, hub_id="meta-llama/Llama-2-7b-hf"),
    _shape("llama-2-13b", 5120, 13824, 40, 40, 40, 32000, False, 4096, hub_id="meta-llama/Llama-2-13b-hf"),
    _shape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, False, 8192, hub_id="meta-llama/Meta-Llama-3-8B-Instruct"),
    _shape("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, False, 131072, hub_id="meta-llama/Llama-3.1-8B-Instruct"),
    _shape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, True, 131072, head_dim=64,
           hub_id="meta-llama/Llama-3.2-1B-Instruct"),
    _shape("llama-3.2-3b", 3072, 8192, 28, 24, 8, 128256, True, 131072, head_dim=128,
           hub_id="meta-llama/Llama-3.2-3B-Instruct"),
    _shape("mistral-7b-v0.3", 4096, 14336, 32, 32, 8, 32768, False, 32768, model_type="mistral",
           hub_id="mistralai/Mistral-7B-Instruct-v0.3"),
    _shape("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, True, 32768, model_type="qwen2", attention_bias=True,
           hub_id="Qwen/Qwen2.5-0.5B-Instruct"),
    _shape("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, True, 32768, model_type="qwen2", attention_bias=True,
           hub_id="Qwen/Qwen2.5-1.5B-Instruct"),
    _shape("qwen2.5-3b", 2048, 11008, 36, 16, 2, 151936, True, 32768, model_type="qwen2", attention_bias=True,
           hub_id="Qwen/Qwen2.5-3B-Instruct"),
    _shape("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, False, 32768, model_type="qwen2", attention_bias=True,
           hub_id="Qwen/Qwen2.5-7B-Instruct"),
    _shape("qwen2.5-14b", 5120, 13824, 48, 40, 8, 152064, False, 32768, model_type="qwen2", attention_bias=True,
           hub_id="Qwen/Qwen2.5-14B-Instruct"),
    _shape("qwen3-8b", 4096, 12288, 36, 32, 8, 151936, False, 40960, head_dim=128, model_type="qwen3",
           qk_norm=True, hub_id="Qwen/Qwen3-8B"),
    _shape("gemma-2-2b", 2304, 9216, 26, 8, 4, 256000, True, 8192, head_dim=256, model_type="gemma2",
           norms_per_layer=4, logit_softcap=30.0, sliding_window=4096, hub_id="google/gemma-2-2b-it"),
    _shape("gemma-2-9b", 3584, 14336, 42, 16, 8, 256000, True, 8192, head_dim=256, model_type="gemma2",
           norms_per_layer=4, logit_softcap=30.0, sliding_window=4096, hub_id="google/gemma-2-9b-it"),
    # Gemma 3 4B is multimodal: the text model below plus a SigLIP vision tower (~417M params).
    _shape("gemma-3-4b", 2560, 10240, 34, 8, 4, 262208, True, 131072, head_dim=256, model_type="gemma3_text",
           norms_per_layer=4, qk_norm=True, sliding_window=1024, vision_params=417_000_000,
           hub_id="google/gemma-3-4b-it"),
    _shape("phi-3-mini", 3072, 8192, 32, 32, 32, 32064, False, 4096, model_type="phi3",
           hub_id="microsoft/Phi-3-mini-4k-instruct"),
    _shape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, True, 8192, hub_id="smollm2-135m-instruct"),
    _shape("smollm2-360m", 960, 2560, 32, 15, 5, 49152, True, 8192, hub_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
    _shape("smollm2-1.7b", 2048, 8192, 24, 32, 32, 49152, True, 8192, hub_id="HuggingFaceTB/SmolLM2-1.7B-Instruct"),
]}

# Hub ids under these prefixes are gated: the model page asks to accept a licence before any download
# (Llama, Mistral, Gemma); a config that names one says so (see gated_note).
GATED_HUB_PREFIXES = ("meta-llama/", "mistralai/", "google/gemma")


def is_gated_hub_id(ref: str | None) -> bool:
    """``ref`` is a hub id of a gated family (:data:`GATED_HUB_PREFIXES`)."""
    return bool(ref) and str(ref).lower().startswith(tuple(p.lower() for p in GATED_HUB_PREFIXES))


def gated_note(hub_id: str) -> str:
    """What to do before a config naming the gated ``hub_id`` can run (one line)."""
    return (f"{hub_id} is gated on the hub: accept its licence on https://huggingface.co/{hub_id} and log in "
            "(huggingface-cli login or HF_TOKEN) before running, or name an ungated copy in model.name (for example "
            "a mirror under unsloth/ or NousResearch/)")


# Other spellings of catalogued models (after normalization, see _normalize).
ALIASES = {
    "llama3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3.1-8b", "llama3.1-8b": "llama-3.1-8b",
    "llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b", "llama3.2-1b": "llama-3.2-1b",
    "llama3.2-3b": "llama-3.2-3b", "mistral-7b": "mistral-7b-v0.3", "qwen2.5-7b": "qwen2.5-7b",
    "phi-3-mini-4k": "phi-3-mini", "phi-3-mini-128k": "phi-3-mini", "phi-3.5-mini": "phi-3-mini",
    "smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m", "qwen3-8b": "qwen3-8b",
    "gemma2-9b": "gemma-2-9b", "gemma3-4b": "gemma-3-4b",
}

# transformers' default for tie_word_embeddings when a config.json leaves it out.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "qwen2_moe"}
_UNTIED_BY_DEFAULT = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "olmo2", "granite"}
_NON_GATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "gpt_bigcode"}


def _normalize(name: str) -> str:
    """'meta-llama/Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'; 'unsloth/llama-3-8b-bnb-4bit' -> 'llama-3-8b'."""
    s = name.strip().lower().replace("_", "-")
    s = s.rsplit("/", 1)[-1]
    for suffix in ("-bnb-4bit", "-unsloth", "-gguf", "-instruct", "-chat", "-it", "-hf", "-base"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
    s = s.replace("-instruct-", "-").replace("-chat-", "-")
    if s.startswith("meta-llama-"):
        s = s[len("meta-"):]
    return s


def catalog_names() -> list[str]:
    return list(CATALOG)


def find_in_catalog(name: str) -> ModelShape | None:
    """A catalogued shape for a catalog name, alias, embedded name or catalogued hub id."""
    key = _normalize(name)
    key = ALIASES.get(key, key)
    if key in CATALOG:
        return CATALOG[key]
    for shape in CATALOG.values():
        if shape.hub_id and shape.hub_id.lower() == name.strip().lower():
            return shape
    return None


def _first(d: dict, *keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def shape_from_config(config: dict, name: str = "model", hub_id: str | None = None) -> ModelShape:
    """A :class:`ModelShape` from a transformers ``config.json`` dict (multimodal: its text_config)."""
    model_type = str(config.get("model_type") or "llama")
    text = config.get("text_config") or config.get("language_config") or config.get("llm_config") or config
    text_type = str(text.get("model_type") or model_type)
    try:
        h = int(_first(text, "hidden_size", "n_embd", "d_model", "dim"))
        layers = int(_first(text, "num_hidden_layers", "n_layer", "num_layers", "n_layers"))
        heads = int(_first(text, "num_attention_heads", "n_head", "num_heads", "n_heads"))
    except (TypeError, ValueError):
        raise PlannerError(
            f"{name}: config.json lacks hidden_size / num_hidden_layers / num_attention_heads; "
            "not a decoder-only transformer config the planner understands"
        ) from None
    kv = int(_first(text, "num_key_value_heads", "n_kv_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(text, "head_dim", default=h // heads))
    experts = int(_first(text, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    inter = _first(text, "moe_intermediate_size") if experts else None
    inter = int(inter or _first(text, "intermediate_size", "ffn_hidden_size", "n_inner", default=4 * h) or 4 * h)
    vocab = int(_first(text, "vocab_size", default=_first(config, "vocab_size", default=32000)))
    if "tie_word_embeddings" in config:
        tied = bool(config["tie_word_embeddings"])
    elif "tie_word_embeddings" in text:
        tied = bool(text["tie_word_embeddings"])
    else:
        tied = text_type in _TIED_BY_DEFAULT or (text_type not in _UNTIED_BY_DEFAULT)
    max_pos = int(_first(text, "max_position_embeddings", "n_positions", "max_seq_len",
                         default=_first(config, "max_position_embeddings", default=4096)))
    sliding = text.get("sliding_window") if text.get("use_sliding_window", True) else None
    vision = config.get("vision_config")
    vision_params = 0
    if isinstance(vision, dict) and vision.get("hidden_size"):
        vh = int(vision["hidden_size"])
        vi = int(vision.get("intermediate_size") or 4 * vh)
        vl = int(vision.get("num_hidden_layers") or 0)
        vision_params = vl * (4 * vh * vh + 2 * vh * vi) + vh * h  # blocks + projector (estimate)
    quant = config.get("quantization_config") or {}
    prequantized = quant.get("quant_method") == "bitsandbytes" and bool(
        quant.get("load_in_4bit") or quant.get("_load_in_4bit") or quant.get("bnb_4bit_quant_type"))
    return ModelShape(
        name=name, hidden_size=h, intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, vocab_size=vocab, tie_embeddings=tied, max_positions=max_pos, model_type=text_type,
        hub_id=hub_id, attention_bias=bool(text.get("attention_bias") or text_type == "qwen2"),
        gated_mlp=text_type not in _NON_GATED,
        norms_per_layer=4 if text_type.startswith("gemma2") or text_type.startswith("gemma3") else 2,
        qk_norm=text_type in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2"),
        num_experts=experts, experts_per_token=int(_first(text, "num_experts_per_tok", "top_k", default=0) or 0),
        logit_softcap=text.get("final_logit_softcapping"),
        sliding_window=int(sliding) if sliding else None, vision_params=vision_params, prequantized=prequantized,
    )


def read_config_file(path) -> dict:
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        p = p / "config.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlannerError(f"{str(p)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise PlannerError(f"{str(p)!r} is not valid JSON: {e}") from None


def fetch_hub_config(hub_id: str) -> dict:
    """``config.json`` of a hub repo: from the local hub cache, else through huggingface_hub
    (respects HF_HUB_OFFLINE, HF_ENDPOINT and a stored token). Fails fast when the hub is unreachable."""
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise PlannerError(f"model {hub_id!r}: not in the catalog and huggingface_hub is not installed") from None

    def fail(why: str):
        return PlannerError(
            f"model {hub_id!r}: not in the planner's catalog and its config.json could not be fetched ({why}). "
            f"Give a local checkpoint directory, or a catalog name: {', '.join(CATALOG)}")

    try:
        cached = try_to_load_from_cache(hub_id, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str) and os.path.isfile(cached):
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise fail("HF_HUB_OFFLINE is set and it is not in the local cache")
    if not _reachable(getattr(constants, "ENDPOINT", "https://huggingface.co")):
        raise fail("the hub is not reachable from here")
    try:
        path = hf_hub_download(hub_id, "config.json")
    except Exception as e:  # gated, missing, network: all say the same to the user
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise fail(f"{type(e).__name__}: {first}") from None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def resolve_shape(model) -> ModelShape:
    """A :class:`ModelShape` for a ModelShape, a config dict, a local path, a catalog name or a hub id."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        return shape_from_config(model, name=str(model.get("_name_or_path") or model.get("model_type") or "model"))
    if not isinstance(model, (str, os.PathLike)):
        raise PlannerError(f"model: give a name, path, hub id, config dict or ModelShape, not {type(model).__name__}")
    text = str(model).strip()
    path = Path(os.path.expanduser(text))
    if path.is_dir() or (path.is_file() and path.name.endswith(".json")):
        cfg = read_config_file(path)
        directory = path if path.is_dir() else path.parent
        return shape_from_config(cfg, name=directory.name, hub_id=str(directory) if path.is_file() else text)
    shape = find_in_catalog(text)
    if shape is not None:
        return shape
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise PlannerError(f"model: path {text!r} does not exist")
    if text.count("/") == 1:
        cfg = fetch_hub_config(text)
        return shape_from_config(cfg, name=text.rsplit("/", 1)[-1], hub_id=text)
    hint = difflib.get_close_matches(_normalize(text), list(CATALOG) + list(ALIASES), n=3, cutoff=0.5)
    raise PlannerError(
        f"model {text!r} is not in the planner's catalog"
        + (f" (did you mean {', '.join(repr(h) for h in hint)}?)" if hint else "")
        + f"; known: {', '.join(CATALOG)}; or give a local checkpoint directory or a hub id (org/name)"
    )
