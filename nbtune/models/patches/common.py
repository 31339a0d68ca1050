"""The patched forwards every family shares, and how they are installed on module instances.

Each transformers module keeps its class, parameters and children; only its ``forward`` is
replaced, on the instance (``module.forward = MethodType(...)``), so an unpatched model in the same
process is untouched and :func:`uninstall` gives the original back. Every patched forward reads
its options from ``module._nbtune`` (set at install time) and computes what the transformers
forward computes, in the same order, with nbtune.kernels where they apply:

``norm_forward``
    ``rms_norm(x, weight, eps, offset)`` (offset 1.0 and Gemma's casting for Gemma's ``1 + w``).
``attention_forward``
    Q/K/V through ``lora_qkv`` when all three projections are fusable LoRA layers (else each
    through ``lora_linear`` or the module itself), q/k norms (Qwen3, Gemma 3), ``apply_rope``, then
    either the plan-driven SDPA of ``attention.attend`` (training path) or transformers' own
    attention function with the mask it built (generation, KV cache, left padding: the original
    semantics, so the kernels change nothing there), then ``o_proj``.
``mlp_forward``
    ``lora_mlp`` (gate, up, down fused, SwiGLU or GeGLU) when the three projections are fusable
    (as the checkpointed tail of its decoder layer where the family allows: nothing in the recompute);
    otherwise the projections one by one and ``swiglu``/``geglu``. Phi-3's fused ``gate_up_proj``
    is one ``lora_linear`` whose output is split.
``model_forward`` (``LlamaModel`` & co.)
    Decides once per step whether the batch can take the fast path (no KV cache, no output
    capture, no left padding) and builds the :class:`~.attention.AttentionPlan` that every layer
    receives as its ``attention_mask``; no mask tensor is built. Anything else runs the original
    forward (which then runs the patched layers with the masks transformers builds).
``causal_lm_forward`` (``LlamaForCausalLM`` & co.)
    With labels: ``fused_linear_cross_entropy`` on the last hidden states (HF's shift, -100,
    ``num_items_in_batch``, Gemma 2/3's final softcap); the logits are never built and the output's
    ``logits`` is None. Without labels: the original forward (logits for generation).

KV cache argument: transformers up to 5.23 names it ``past_key_values``, 5.24 on ``cache`` (the old
name still accepted, with a deprecation warning, until 5.40). Every patched forward takes either
(:func:`take_cache`) and hands the cache on under the name the receiving forward declares
(:func:`cache_kwarg`), so generation after training updates the same cache transformers would.

A projection is *fusable* (:func:`lora_projection`) when it is a peft LoRA layer with one active,
unmerged, enabled adapter, dropout 0, no DoRA / variant / lora_bias, over a bitsandbytes
``Linear4bit`` or a 16/32-bit ``nn.Linear``. Everything else is called as the module it is.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types

import torch
import torch.nn as nn

from nbtune.kernels.cross_entropy import fused_linear_cross_entropy
from nbtune.kernels.glu import geglu, swiglu
from nbtune.kernels.lora import LoRAProjection, lora_linear, lora_mlp, lora_parts, lora_qkv
from nbtune.kernels.offload import checkpoint_phase
from nbtune.kernels.rms_norm import rms_norm
from nbtune.kernels.rope import apply_rope

from .attention import PLAN_KEY, AttentionPlan, attend, build_plan, plan_fits
from .host_facts import drop_host_facts

try:  # bitsandbytes is a dependency, but the patches must not need it to import
    import bitsandbytes as _bnb

    _LINEAR_4BIT = _bnb.nn.Linear4bit
    _LINEAR_8BIT = _bnb.nn.Linear8bitLt
except Exception:  # pragma: no cover - platforms without bitsandbytes
    _LINEAR_4BIT = _LINEAR_8BIT = ()

try:
    from peft.tuners.lora import LoraLayer as _LoraLayer
except Exception:  # pragma: no cover
    _LoraLayer = ()

# activation name in the config -> GLU kind of nbtune.kernels.lora.lora_mlp
ACTIVATIONS = {
    "silu": "swiglu", "swish": "swiglu",
    "gelu": "geglu", "gelu_python": "geglu",
    "gelu_pytorch_tanh": "geglu_tanh", "gelu_python_tanh": "geglu_tanh", "gelu_new": "geglu_tanh",
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- install / uninstall
def install(module: nn.Module, forward, **options) -> bool:
    """Point ``module.forward`` at ``forward`` (bound to the module) with ``options`` readable as
    ``module._nbtune.<name>``; the forward it replaces stays reachable as ``module._nbtune.original``.
    A module already patched is left as it is (returns False). A module whose patch was undone while
    a wrapper around it stayed (:func:`uninstall`: TRL's fused LM head) gets the same patch switched
    back on inside that wrapper (a notebook's second run on the reused base model)."""
    state = module.__dict__.get("_nbtune")
    if state is not None and module.__dict__.get("forward") is None:
        # Something took the patched forward off the instance since (transformers' hub kernels do when
        # they re-kernelize: kernels' fallback pops instance forwards): nothing of that patch is left.
        del module.__dict__["_nbtune"]
        state = None
    if state is not None:
        if not getattr(state, "passthrough", False) or state.patched.__func__ is not forward:
            return False
        state.passthrough = False
        for name, value in options.items():
            setattr(state, name, value)
        return True
    had_instance_forward = module.__dict__.get("forward")
    state = types.SimpleNamespace(original=module.forward, had_instance_forward=had_instance_forward, **options)
    patched = types.MethodType(forward, module)
    state.patched = patched
    module.__dict__["_nbtune"] = state
    module.forward = patched
    return True


def uninstall(module: nn.Module) -> bool:
    """Give ``module`` its forward back. When something wrapped the patched forward since (TRL's
    fused LM head does), the wrapper is kept and the patch inside it turned into a pass-through."""
    state = module.__dict__.get("_nbtune")
    if state is None:
        return False
    current = module.__dict__.get("forward")
    if current is state.patched:
        if state.had_instance_forward is None:
            del module.__dict__["forward"]
        else:
            module.forward = state.had_instance_forward
        del module.__dict__["_nbtune"]
    elif current is None:  # the patched forward was already taken off (see install): only the state is left
        del module.__dict__["_nbtune"]
    else:
        state.passthrough = True
    return True


def _original(self, *args, **kwargs):
    return self._nbtune.original(*args, **kwargs)


def patch_on(module: nn.Module) -> bool:
    """Whether ``module`` carries an nbtune patch that is switched on (installed, not undone, and its
    forward still on the instance)."""
    state = module.__dict__.get("_nbtune")
    return (state is not None and not getattr(state, "passthrough", False)
            and module.__dict__.get("forward") is not None)


def _passthrough(self) -> bool:
    return getattr(self._nbtune, "passthrough", False)


# ----------------------------------------------------------------------------- KV cache argument
def take_cache(past_key_values, kwargs: dict):
    """The KV cache a patched forward was handed, under either name: ``past_key_values``
    (transformers <= 5.23, and callers still using it) or ``cache`` (5.24 on), popped from ``kwargs``.
    Both at once is the caller's mistake, answered the way transformers answers it."""
    cache = kwargs.pop("cache", None)
    if past_key_values is not None and cache is not None:
        raise ValueError("The KV cache was passed twice, as `past_key_values` and as `cache`: pass it once, as "
                         f"`{_default_cache_kwarg()}` (the name this transformers release uses).")
    return past_key_values if past_key_values is not None else cache


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls) -> str:
    try:
        params = inspect.signature(cls.forward).parameters  # follows functools.wraps' __wrapped__
    except (TypeError, ValueError):
        return _default_cache_kwarg()
    if "cache" in params:
        return "cache"
    return "past_key_values" if "past_key_values" in params else _default_cache_kwarg()


def cache_kwarg(module: nn.Module) -> str:
    """The name under which ``type(module).forward`` (transformers' own forward, whatever patch the
    instance carries) takes the KV cache: ``"cache"`` from transformers 5.24, ``"past_key_values"`` before."""
    return _cache_kwarg_of(type(module))


@functools.lru_cache(maxsize=None)
def _default_cache_kwarg() -> str:
    """This transformers release's name for the KV cache argument, read off LlamaModel's forward
    (for a forward that declares neither name and takes it through ``**kwargs``)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaModel

        params = inspect.signature(LlamaModel.forward).parameters
    except Exception:  # pragma: no cover - transformers without Llama
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_fields(output_class, source, skip=()) -> dict:
    """The fields of model output ``source`` that ``output_class`` declares (non-None ones, less
    ``skip``): how an output is carried from a backbone's output class to the head's across
    transformers releases that rename (``past_key_values`` -> ``cache``) or replace fields
    (Gemma 3's ``image_hidden_states`` -> ``image_outputs`` in 5.24)."""
    names = {f.name for f in dataclasses.fields(output_class)}
    return {k: v for k, v in source.items() if k in names and k not in skip}


# ----------------------------------------------------------------------------- projections
def _lora_state_key(module):
    """What decides fusability and the parts of a peft LoRA layer, read straight from instance
    dicts (a few microseconds, against ~30 for peft's properties): the active adapter, merged /
    disabled flags, and the identities of that adapter's A, B, dropout and their parameters."""
    d = module.__dict__
    active = d.get("_active_adapter")
    if not isinstance(active, str):
        if not active or len(active) != 1:
            return None
        active = active[0]
    children = d["_modules"]
    lora_a = children["lora_A"]._modules.get(active)
    lora_b = children["lora_B"]._modules.get(active)
    dropout = children["lora_dropout"]._modules.get(active)
    if lora_a is None or lora_b is None:
        return None
    return (active, tuple(d.get("merged_adapters", ())), d.get("_disable_adapters"), d["scaling"].get(active),
            id(lora_a), id(lora_b), id(dropout), getattr(dropout, "p", None),
            id(lora_a._parameters.get("weight")), id(lora_b._parameters.get("weight")))


def lora_projection(module) -> LoRAProjection | None:
    """(base, A, B, scaling, bias) when ``module`` can run through the fused LoRA kernels, else None.

    Cached per module under a key of the state that decides it (``_lora_state_key``), so the
    check costs a few microseconds per projection and step instead of peft's property lookups.
    """
    if not _LoraLayer or not isinstance(module, _LoraLayer):
        return None
    try:
        key = _lora_state_key(module)
    except (KeyError, AttributeError):
        key = None
    cached = module.__dict__.get("_nbtune_lora")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    parts = _lora_projection_uncached(module)
    if key is not None:
        module.__dict__["_nbtune_lora"] = (key, parts)
    return parts


def _lora_projection_uncached(module) -> LoRAProjection | None:
    try:
        parts = lora_parts(module)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    base = parts.base
    if _LINEAR_4BIT and isinstance(base, _LINEAR_4BIT):
        if getattr(base.weight, "quant_state", None) is None:
            return None
    elif not isinstance(base, nn.Linear) or (_LINEAR_8BIT and isinstance(base, _LINEAR_8BIT)):
        return None
    elif base.weight.dtype not in _FLOAT_DTYPES:
        return None
    return parts


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, through ``lora_linear`` when the module is a fusable LoRA layer."""
    parts = lora_projection(module)
    if parts is None:
        return module(x)
    return lora_linear(x, parts.base, parts.lora_A, parts.lora_B, parts.scaling, parts.bias)


def project_qkv(attn, x: torch.Tensor):
    """(q, k, v) projections of x, each (..., out): fused QKV when all three are fusable."""
    modules = (attn.q_proj, attn.k_proj, attn.v_proj)
    parts = [lora_projection(m) for m in modules]
    if all(p is not None for p in parts):
        return lora_qkv(x, *parts)
    return tuple(m(x) if p is None else lora_linear(x, *p) for m, p in zip(modules, parts))


def glu(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "swiglu":
        return swiglu(gate, up)
    return geglu(gate, up, approximate="tanh" if kind == "geglu_tanh" else "none")


# ----------------------------------------------------------------------------- norms and MLP
def _checkpointed_tail(mlp) -> bool:
    """Whether this MLP call is the tail of a checkpointed decoder layer: the layer being checkpointed
    owns it as ``.mlp`` and the family adds the MLP's output straight to the residual stream (no
    post-MLP norm, which would save that output for its backward). Then ``lora_mlp`` may skip it
    in the recompute (see nbtune.kernels.lora._LoRAMLPCheckpointed)."""
    if not mlp._nbtune.output_summed:
        return False
    phase = checkpoint_phase()
    return phase is not None and getattr(phase.owner, "mlp", None) is mlp


def norm_forward(self, hidden_states):
    if _passthrough(self):
        return _original(self, hidden_states)
    eps = getattr(self, "variance_epsilon", None)
    if eps is None:
        eps = self.eps
    return rms_norm(hidden_states, self.weight, eps=eps, offset=self._nbtune.offset)


def mlp_forward(self, x):
    if _passthrough(self):
        return _original(self, x)
    kind = self._nbtune.activation
    if self._nbtune.fused_gate_up:  # Phi-3: one gate_up_proj, gate first
        gate_up = linear(self.gate_up_proj, x)
        gate, up = gate_up.chunk(2, dim=-1)
        return linear(self.down_proj, glu(gate, up, kind))
    parts = [lora_projection(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
    if all(p is not None for p in parts):
        return lora_mlp(x, *parts, activation=kind, checkpointed_tail=_checkpointed_tail(self))
    gate = linear(self.gate_proj, x)
    up = linear(self.up_proj, x)
    return linear(self.down_proj, glu(gate, up, kind))


# ----------------------------------------------------------------------------- attention
def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                      **kwargs):
    cache = take_cache(past_key_values, kwargs)
    if _passthrough(self):
        return _original(self, hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                         **{cache_kwarg(self): cache}, **kwargs)
    opts = self._nbtune
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    if opts.fused_qkv:  # Phi-3: one qkv_proj, [q | k | v] along the features
        qkv = linear(self.qkv_proj, hidden_states)
        q_size = self.config.num_attention_heads * self.head_dim
        kv_size = self.config.num_key_value_heads * self.head_dim
        query, key, value = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
    else:
        query, key, value = project_qkv(self, hidden_states)
    query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
    if opts.qk_norm:  # over head_dim: the same before or after the transpose
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rope(query, key, cos, sin)
    dropout = self.attention_dropout if self.training else 0.0

    if isinstance(attention_mask, AttentionPlan):
        out = attend(query, key, value, attention_mask, scale=self.scaling, window=opts.window(self),
                     softcap=opts.softcap, dropout=dropout)
        weights = None
    else:  # transformers' own attention, with the mask it built (generation, KV cache, left padding)
        if cache is not None:
            if cache_kwarg(self) == "cache":  # 5.24 on: the layer's kwargs go along (as transformers passes them)
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
            else:
                key, value = cache.update(key, value, self.layer_idx)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = opts.eager_attention
        if opts.softcap is not None:  # sdpa/flash would drop the softcap; eager applies it
            interface = eager
        else:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        extra = {}
        if opts.passes_window:
            extra["sliding_window"] = opts.window(self)
        if opts.softcap is not None:
            extra["softcap"] = opts.softcap
        out, weights = interface(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling,
                                 **extra, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return linear(self.o_proj, out), weights


# ----------------------------------------------------------------------------- model (decoder stack)
def _flag(config, kwargs, name) -> bool:
    value = kwargs.get(name)
    if value is None:
        value = getattr(config, name, False)
    return bool(value)


_UNPLANNED = object()


def fast_path_plan(model, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs,
                   planned=_UNPLANNED):
    """The AttentionPlan for this call, or None when transformers' own forward must run.
    ``cache``: the KV cache handed in (either name, :func:`take_cache`). ``planned``: the plan the
    collator built on the host (``PLAN_KEY``), used when it fits the rows."""
    if cache is not None:
        return None
    config = model.config
    if use_cache is None:
        use_cache = getattr(config, "use_cache", False)
    if use_cache and not model.training:  # an eval-mode call that wants a KV cache back
        return None
    if _flag(config, kwargs, "output_attentions") or _flag(config, kwargs, "output_hidden_states"):
        return None
    if isinstance(attention_mask, dict):
        return None
    shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    batch, length = shape[0], shape[1]
    if planned is not _UNPLANNED and plan_fits(planned, batch, length):
        return planned
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    return build_plan(batch, length, attention_mask, position_ids, cu_seq_lens)


def model_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                  inputs_embeds=None, use_cache=None, **kwargs):
    cache = take_cache(past_key_values, kwargs)
    args = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, use_cache=use_cache, **{cache_kwarg(self): cache})
    planned = kwargs.pop(PLAN_KEY, _UNPLANNED)
    if _passthrough(self) or (input_ids is None) == (inputs_embeds is None):
        return _original(self, **args, **kwargs)
    plan = fast_path_plan(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs,
                          planned)
    if plan is None:
        return _original(self, **args, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    for name in ("output_attentions", "output_hidden_states", "use_cache"):
        kwargs.pop(name, None)
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
    hidden = inputs_embeds
    if self._nbtune.scale_embeddings:  # Gemma where transformers scales in its model forward (Family.apply)
        hidden = hidden * torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)
    layer_types = getattr(self.config, "layer_types", None)
    if self._nbtune.rope_per_layer_type:  # Gemma 3: local layers have their own RoPE base
        by_type = {t: self.rotary_emb(hidden, position_ids, t) for t in set(layer_types)}
        rope = [by_type[layer_types[i]] for i in range(self.config.num_hidden_layers)]
    else:
        shared = self.rotary_emb(hidden, position_ids)
        rope = [shared] * self.config.num_hidden_layers
    for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
        hidden = layer(hidden, attention_mask=plan, position_embeddings=rope[i], position_ids=position_ids, **kwargs)
    hidden = self.norm(hidden)
    out = BaseModelOutputWithPast(last_hidden_state=hidden)  # no KV cache on this path
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


# ----------------------------------------------------------------------------- causal LM head + loss
def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                      inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    cache = take_cache(past_key_values, kwargs)
    args = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, use_cache=use_cache)
    head = self.get_output_embeddings()
    shift_labels = kwargs.get("shift_labels")
    if (_passthrough(self) or (labels is None and shift_labels is None) or type(head) is not nn.Linear
            or head.weight.dtype not in _FLOAT_DTYPES):
        return _original(self, labels=labels, logits_to_keep=logits_to_keep, **args, **{cache_kwarg(self): cache},
                         **drop_host_facts(kwargs))
    if use_cache is None:  # a loss needs no KV cache; without one an eval-mode call keeps the fast path
        args["use_cache"] = False
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    return_dict = kwargs.pop("return_dict", None)
    backbone = getattr(self, self._nbtune.backbone)
    outputs = backbone(**args, **{cache_kwarg(backbone): cache}, return_dict=True, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:  # transformers' ForCausalLMLoss: token t predicts label t+1
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    softcap = self._nbtune.final_softcap(self)
    loss = fused_linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), ignore_index=ignore_index,
                                      softcap=softcap, bias=head.bias, num_items_in_batch=num_items_in_batch)
    output_class = self._nbtune.output_class
    out = output_class(loss=loss, logits=None, **output_fields(output_class, outputs, skip=("loss", "logits")))
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()
