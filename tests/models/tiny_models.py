"""Helpers for tests/models: tiny random models of every patched family, and LoRA pairs
(nbtune-patched vs plain transformers).

Every config is hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 128, intermediate 128, with the
family's special paths switched on at sizes the tests exceed: sliding window 8 (sequences are
longer), Gemma 2 attention + final logit softcaps small enough to bite, Gemma 3 one local and one
global layer with different RoPE bases, Phi-3 partial rotary, Qwen2/3 one sliding layer.
Norm weights are randomized so (1 + w) vs w mistakes show.
"""
from __future__ import annotations

import copy

import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3"]
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              intermediate_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 8


def tiny_config(kind: str):
    import transformers as tf

    c = dict(COMMON)
    if kind == "llama":
        return tf.LlamaConfig(**c)
    if kind == "mistral":
        return tf.MistralConfig(**c, sliding_window=WINDOW)
    if kind == "qwen2":
        return tf.Qwen2Config(**c, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if kind == "qwen3":
        return tf.Qwen3Config(**c, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if kind == "gemma":
        return tf.GemmaConfig(**c, head_dim=16)
    if kind == "gemma2":
        # eager: transformers' sdpa path drops the attention softcap, eager applies it (the true math)
        return tf.Gemma2Config(**c, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                               final_logit_softcapping=3.0, query_pre_attn_scalar=16, attn_implementation="eager")
    text = dict(c, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                query_pre_attn_scalar=16, rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    if kind == "gemma3_text":
        return tf.Gemma3TextConfig(**text, final_logit_softcapping=3.0)
    if kind == "gemma3":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=127,
                               boi_token_index=125, eoi_token_index=126)
    if kind == "phi3":
        return tf.Phi3Config(**c, sliding_window=WINDOW, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    raise KeyError(kind)


def tiny_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(kind)
    if kind == "gemma3":
        model = Gemma3ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    gemma = kind.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.normal_(0.0 if gemma else 1.0, 0.2)
    return model.float()


def randomize_lora_b(peft_model, seed: int = 2):
    """LoRA B starts at zero; give it identical non-zero values so the adapters matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def lora_pair(kind: str, r: int = 4, dropout: float = 0.0, targets="all-linear"):
    """(nbtune-patched PeftModel, plain transformers+peft PeftModel): same weights, same adapters.

    The patched one uses add_lora's defaults (offloaded checkpointing, which on CPU is plain
    recomputation); the reference has no checkpointing and no patches.
    """
    import nbtune

    base = tiny_model(kind)
    ref_base = copy.deepcopy(base)
    ours = nbtune.add_lora(base, r=r, alpha=2 * r, dropout=dropout, seed=1, targets=targets)
    ref = nbtune.add_lora(ref_base, r=r, alpha=2 * r, dropout=dropout, seed=1, targets=targets,
                          gradient_checkpointing="off", patch=False)
    randomize_lora_b(ours)
    randomize_lora_b(ref)
    return ours, ref


def lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def assert_grads_match(ours, ref, min_cosine=0.999):
    g_ours, g_ref = lora_grads(ours), lora_grads(ref)
    assert g_ours.keys() == g_ref.keys() and len(g_ours) > 0
    for name in g_ours:
        assert g_ref[name].abs().sum() > 0, f"{name}: zero reference gradient (test would prove nothing)"
        c = cosine(g_ours[name], g_ref[name])
        assert c >= min_cosine, f"{name}: cosine {c:.6f}"


LOSS_RTOL = 1e-4  # patched vs transformers, fp32 on the CPU


def rel(a, b) -> float:
    a, b = (float(x.detach()) if torch.is_tensor(x) else float(x) for x in (a, b))
    return abs(a - b) / abs(b)


def reference_inputs(model, ids) -> dict:
    """What transformers' own forward of ``model`` takes besides the ids of a text batch: a
    multimodal Gemma 3 in training asks ``token_type_ids`` up to transformers 5.5 (zeros: no image
    token, what Gemma 3's processor gives with text alone; later releases read their absence so)."""
    if model.config.model_type == "gemma3":
        return {"token_type_ids": torch.zeros_like(ids)}
    return {}


def assert_loss_and_grads_match(ours, ref, ids, labels):
    """The same loss (within LOSS_RTOL) and LoRA gradients (cosine) from the patched and the plain
    model on one batch."""
    loss = ours(input_ids=ids, labels=labels).loss
    ref_loss = ref(input_ids=ids, labels=labels, **reference_inputs(ref, ids)).loss
    assert rel(loss, ref_loss) < LOSS_RTOL, (loss.item(), ref_loss.item())
    loss.backward()
    ref_loss.backward()
    assert_grads_match(ours, ref)


def sgd_step(model, ids, labels, lr=0.5):
    """One plain SGD step on the trainable parameters; returns the loss before it."""
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= lr * p.grad
                p.grad = None
    return loss


def random_batch(batch=2, length=24, seed=3, vocab=128):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 4, (batch, length), generator=generator)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    return ids, labels


def word_tokenizer():
    """A 128-word tokenizer built in memory (no hub): token "t<i>" has id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(128)}, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t2", unk_token="t1")
