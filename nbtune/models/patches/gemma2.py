"""Gemma 2: Gemma's norms, GeGLU-tanh and embedding scale, plus

- attention logit softcapping ``c * tanh(scores / c)`` (``attn_logit_softcapping``): SDPA cannot
  apply it, so the training path runs ``attention.SoftcapAttention`` (exact, chunked, recomputing
  backward) and the generation path transformers' eager attention, which applies it. Unpatched
  transformers with ``attn_implementation="sdpa"`` silently skips this softcap; compare against
  ``"eager"`` (the tests do);
- final logit softcapping (``final_logit_softcapping``) inside the fused cross-entropy;
- pre/post feed-forward norms and the post-attention norm: transformers' decoder layer is kept, so
  they run as they do there, through the patched RMSNorm;
- sliding-window layers (``layer_types``; window ``config.sliding_window``) with exact semantics;
- the query scale ``query_pre_attn_scalar ** -0.5`` (the module's ``scaling``).
"""
from .family import Family, final_softcap_from_config, window_from_module

GEMMA2 = Family(name="gemma2", model_types=("gemma2",), prefix="Gemma2", norm_offset=1.0, embed_scale=True,
                activation_key="hidden_activation", attn_softcap=True, post_mlp_norm=True, window=window_from_module,
                passes_window=True,
                final_softcap=final_softcap_from_config)

FAMILIES = (GEMMA2,)
