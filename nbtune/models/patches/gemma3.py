"""Gemma 3, text (``gemma3_text``: Gemma3ForCausalLM) and the text part of the multimodal
``gemma3`` (Gemma3ForConditionalGeneration).

Gemma's ``(1 + w)`` norms, GeGLU-tanh and embedding scale, plus RMSNorms on q and k per head
(``q_norm``/``k_norm``), sliding-window local layers (``layer_types``, window
``config.sliding_window``) whose RoPE has its own base (``rope_parameters["sliding_attention"]``:
the patched model forward asks the rotary module for one cos/sin per layer type, as transformers
does), the query scale ``query_pre_attn_scalar ** -0.5``, and the final logit softcap when the
config sets one (Gemma3ForCausalLM applies it; Gemma3ForConditionalGeneration in transformers 5.17
does not, and neither does its patch). Gemma 3 has no attention-logit softcap (transformers does
not pass ``attn_logit_softcapping`` to its attention).

Multimodal checkpoints: the language model's layers are patched like the text model's. A batch
without images (no ``pixel_values``, no image ``token_type_ids``) goes from ``Gemma3Model`` straight
to the patched language model with its 2-D mask (so the fast path applies); a batch with images
runs transformers' forward (bidirectional attention over image blocks needs its masks), through the
patched norms, MLPs and projections. The trainer's collator tells which batches are text only from
their host tensors (``host_facts.TEXT_ONLY_KEY``), so the choice costs no device synchronization.
Bidirectional configs (``use_bidirectional_attention``) are not patched at all.
"""
from __future__ import annotations

from . import common
from .host_facts import TEXT_ONLY_KEY, TextOnlyCheck, drop_host_facts
from .family import Family, final_softcap_from_config, no_final_softcap, window_from_module


def text_only_check(model) -> TextOnlyCheck | None:
    """The collator's "text only" check for the patched multimodal Gemma 3 backbone in ``model``
    (peft wrappers included), with the backbone's own rule for the image token; None when there is none."""
    for module in model.modules():
        if type(module).__name__ == "Gemma3Model" and common.patch_on(module):
            image = module.config.image_token_id
            return TextOnlyCheck(image if image >= module.vocab_size else None)
    return None


def multimodal_model_forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                             past_key_values=None, token_type_ids=None, inputs_embeds=None, labels=None,
                             use_cache=None, **lm_kwargs):
    cache = common.take_cache(past_key_values, lm_kwargs)
    args = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                position_ids=position_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds, labels=labels,
                use_cache=use_cache, **{common.cache_kwarg(self): cache})
    on_host = lm_kwargs.pop(TEXT_ONLY_KEY, None)  # the collator's verdict, from the host tensors
    text_only = (
        not common._passthrough(self)
        and pixel_values is None
        and lm_kwargs.get("mm_encoder_outputs") is None  # transformers 5.24 on: precomputed image features
        and not isinstance(attention_mask, dict)
        and (input_ids is None) != (inputs_embeds is None)
        and (on_host if on_host is not None else (  # else read from the GPU: up to two syncs
            (token_type_ids is None or not bool(token_type_ids.any()))
            and (input_ids is None or self.config.image_token_id < self.vocab_size
                 or not bool((input_ids == self.config.image_token_id).any()))))
    )
    if not text_only:
        return common._original(self, **args, **drop_host_facts(lm_kwargs))
    from transformers.models.gemma3.modeling_gemma3 import Gemma3ModelOutputWithPast

    lm_kwargs.pop("return_dict", None)
    lm_kwargs.pop("mm_encoder_outputs", None)
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    language_model = self.language_model
    outputs = language_model(attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, return_dict=True, **{common.cache_kwarg(language_model): cache},
                             **lm_kwargs)
    # No image: the image fields (image_hidden_states up to 5.23, image_outputs from 5.24) stay None.
    return Gemma3ModelOutputWithPast(**common.output_fields(Gemma3ModelOutputWithPast, outputs))


def _conditional_generation_options(module):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3CausalLMOutputWithPast

    return dict(backbone="model", final_softcap=no_final_softcap, output_class=Gemma3CausalLMOutputWithPast)


GEMMA3 = Family(
    name="gemma3", model_types=("gemma3_text", "gemma3"), prefix="Gemma3", norm_offset=1.0, embed_scale=True,
    activation_key="hidden_activation", qk_norm=True, post_mlp_norm=True, window=window_from_module, passes_window=True,
    rope_per_layer_type=True, final_softcap=final_softcap_from_config, text_model_names=("Gemma3TextModel",),
    extra={
        "Gemma3Model": (multimodal_model_forward, lambda module: {}),
        "Gemma3ForConditionalGeneration": (common.causal_lm_forward, _conditional_generation_options),
    },
)

FAMILIES = (GEMMA3,)
