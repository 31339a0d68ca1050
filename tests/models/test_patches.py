"""Architecture patches vs plain transformers + peft, per family, fp32 on CPU (the kernels'
reference paths; Llama and Gemma 3 also through the Triton kernels under Triton's interpreter):
same loss (1e-4 relative) and LoRA gradients (cosine >= 0.999), the fused kernels really used,
and the switches and fallbacks (unsupported architecture, NBTUNE_PATCH=0, unpatch, LoRA dropout,
partial targets, a bitsandbytes 4-bit base). Batches (generation, packing, padding): test_batches.py.
"""
from __future__ import annotations

import collections
import importlib.metadata

import pytest
import torch
from tiny_models import (FAMILIES, LOSS_RTOL, WINDOW, assert_loss_and_grads_match, lora_pair, random_batch, rel,
                         sgd_step, tiny_model)

import nbtune
from nbtune.models import patches
from nbtune.models.patches import common

@pytest.fixture
def calls(count_calls):
    """Counts of the kernel entry points the patched forwards call (names as in common.py)."""
    return count_calls(common, ("lora_qkv", "lora_mlp", "lora_linear", "rms_norm", "apply_rope", "attend",
                                "fused_linear_cross_entropy", "build_plan"))


# ----------------------------------------------------------------------------- loss and gradients
def test_loss_and_lora_grads_match_transformers(family, calls):
    ours, ref = lora_pair(family)
    assert patches.is_patched(ours) and not patches.is_patched(ref)
    ids, labels = random_batch(length=3 * WINDOW)  # longer than the sliding window: the band path runs
    assert_loss_and_grads_match(ours, ref, ids, labels)
    # the fused paths really ran: fused QKV/MLP (Phi-3: fused qkv_proj/gate_up_proj as single LoRA
    # linears), the plan-driven attention, the fused loss
    assert calls["attend"] >= 2 and calls["fused_linear_cross_entropy"] == 1 and calls["build_plan"] == 1
    if family == "phi3":
        assert calls["lora_linear"] >= 8
    else:
        assert calls["lora_qkv"] >= 2 and calls["lora_mlp"] >= 2


def test_loss_matches_with_num_items_in_batch_and_sum_semantics(calls):
    ours, ref = lora_pair("llama")
    ids, labels = random_batch()
    n = torch.tensor(57)
    loss = ours(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    ref_loss = ref(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    assert rel(loss, ref_loss) < LOSS_RTOL


def test_labels_give_no_logits_and_no_labels_give_transformers_logits():
    ours, ref = lora_pair("gemma2")
    ids, labels = random_batch()
    out = ours(input_ids=ids, labels=labels)
    assert out.logits is None and out.loss is not None
    ours.eval()
    ref.eval()
    with torch.no_grad():
        logits, ref_logits = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,tail", [("llama", True), ("qwen3", True), ("gemma3_text", False), ("gemma2", False)])
def test_triton_kernels_under_interpreter(kind, tail, kernel_mode, calls, monkeypatch):
    """NBTUNE_KERNELS=triton: every kernel (RMSNorm, RoPE, LoRA QKV/MLP with the GLU kernels,
    fused cross-entropy, offloaded checkpointing machinery) runs its Triton path on CPU tensors.
    Under checkpointing the MLP runs as the layer's checkpointed tail (nothing in the recompute)
    where the output is only summed, and never where a post-MLP norm saves it (Gemma 2/3)."""
    from nbtune.kernels import lora as lora_kernels

    kernel_mode("triton")
    tails = collections.Counter()
    original = lora_kernels.lora_mlp

    def spy(*args, checkpointed_tail=False, **kwargs):
        tails[checkpointed_tail] += 1
        return original(*args, checkpointed_tail=checkpointed_tail, **kwargs)

    monkeypatch.setattr(common, "lora_mlp", spy)
    ours, ref = lora_pair(kind)
    ids, labels = random_batch(length=2 * WINDOW + 3)
    assert_loss_and_grads_match(ours, ref, ids, labels)
    assert calls["rms_norm"] >= 5
    n_layers = ours.config.num_hidden_layers
    # forward + recompute per layer, all as tails or none
    assert tails == ({True: 2 * n_layers} if tail else {False: 2 * n_layers})


# ----------------------------------------------------------------------------- switches and fallbacks
def test_left_padding_falls_back_to_transformers_masks(calls):
    ours, ref = lora_pair("qwen2")
    ids, labels = random_batch()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels[0, :4] = -100
    loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel(loss, ref_loss) < LOSS_RTOL
    assert calls["attend"] == 0 and calls["lora_qkv"] >= 2  # transformers' attention, nbtune's projections


def test_unsupported_architecture_warns_and_still_trains():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=128, vocab_size=128, max_position_embeddings=64))
    with pytest.warns(UserWarning, match=r"'gpt_neox' has no nbtune patch.*llama.*gemma2.*phi3"):
        peft_model = nbtune.add_lora(model, r=4, alpha=8)
    assert not patches.is_patched(peft_model)
    ids, labels = random_batch()
    before = sgd_step(peft_model, ids, labels, lr=1.0)
    after = peft_model(input_ids=ids, labels=labels).loss
    assert torch.isfinite(before) and after < before


def test_patch_switches(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setenv(patches.PATCH_ENV, "0")
    assert not patches.is_patched(nbtune.add_lora(model, r=4))
    monkeypatch.delenv(patches.PATCH_ENV)
    model = tiny_model("llama")
    model.nbtune_patch = False  # what load_model(patch=False) records
    assert not patches.is_patched(nbtune.add_lora(model, r=4))
    model = tiny_model("llama")
    peft_model = nbtune.add_lora(model, r=4)
    assert patches.is_patched(peft_model)
    assert patches.patch_model(peft_model)  # idempotent
    attn = peft_model.get_base_model().model.layers[0].self_attn
    assert "forward" in attn.__dict__
    assert patches.unpatch_model(peft_model) > 0
    assert "forward" not in attn.__dict__ and not patches.is_patched(peft_model)


def test_patch_inside_a_wrapper_comes_back_on_repatching(count_calls):
    """TRL wraps the causal LM's (patched) forward with its fused LM head; unpatching leaves that
    wrapper and turns the patch inside into a pass-through. Patching the same base again (a
    notebook's second run on the reused model) must switch it back on, fused loss included."""
    import functools

    from nbtune.models.patches import common

    peft_model = nbtune.add_lora(tiny_model("llama"), r=4)
    lm = peft_model.get_base_model()
    inner = lm.forward
    lm.forward = functools.wraps(inner)(lambda *a, **k: inner(*a, **k))  # a wrapper around the patch
    patches.unpatch_model(peft_model)
    assert not patches.is_patched(peft_model) and lm._nbtune.passthrough
    calls = count_calls(common, ["fused_linear_cross_entropy"])
    ids, labels = random_batch()
    unpatched_loss = peft_model(input_ids=ids, labels=labels).loss
    assert calls["fused_linear_cross_entropy"] == 0
    patches.patch_model(peft_model)
    assert patches.is_patched(peft_model) and not lm._nbtune.passthrough
    assert rel(peft_model(input_ids=ids, labels=labels).loss, unpatched_loss) < LOSS_RTOL
    assert calls["fused_linear_cross_entropy"] == 1


def test_a_patch_taken_off_from_under_it_is_installed_again(count_calls):
    """Transformers' hub kernels, re-applied on a train()/eval() switch, pop instance forwards off
    RMSNorm modules. A patch whose forward was taken off is reported off, cleans up on unpatching,
    and goes back on when the model is patched again (the next run on a reused model)."""
    peft_model = nbtune.add_lora(tiny_model("llama"), r=4)
    norms = [m for m in peft_model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all(common.patch_on(m) for m in norms)
    for norm in norms:  # what kernels' fallback does to each (_replace_forward: __dict__.pop("forward"))
        norm.__dict__.pop("forward")
    assert not any(common.patch_on(m) for m in norms)
    calls = count_calls(common, ["rms_norm"])
    ids, labels = random_batch()
    peft_model(input_ids=ids, labels=labels)
    assert calls["rms_norm"] == 0
    assert patches.patch_model(peft_model)
    assert all(common.patch_on(m) for m in norms)
    peft_model(input_ids=ids, labels=labels)
    assert calls["rms_norm"] == 5  # 2 layers x 2 norms + the final norm
    for norm in norms:
        norm.__dict__.pop("forward")
    patches.unpatch_model(peft_model)
    assert not any("_nbtune" in m.__dict__ for m in norms)


def test_hub_kernels_are_switched_off_so_the_patches_survive_train_and_eval(count_calls):
    """With Hugging Face's `kernels` installed, transformers (5.25 on: by default) kernelizes the
    model and re-kernelizes on every train()/eval() switch, taking the patched RMSNorm forwards off.
    Patching turns the hub kernels off first, so after the switches the fused norm still runs."""
    try:  # not importorskip: under pytest tests/kernels is an importable namespace folder named kernels
        from transformers.utils import is_kernels_available
    except ImportError:
        pytest.skip("this transformers release has no hub-kernel integration")
    try:  # the installed distribution: an older transformers (5.3) parses the version of tests/kernels, "N/A"
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed here")
    if not is_kernels_available():
        pytest.skip("Hugging Face's kernels package is not installed here (or not in the versions this transformers "
                    "release supports)")
    model = tiny_model("llama")
    model.set_use_kernels(True)  # what from_pretrained does by default from transformers 5.25
    assert model.use_kernels
    peft_model = nbtune.add_lora(model, r=4)
    assert not model.use_kernels
    peft_model.eval()
    peft_model.train()
    calls = count_calls(common, ["rms_norm"])
    ids, labels = random_batch()
    peft_model(input_ids=ids, labels=labels)
    assert calls["rms_norm"] == 5 and patches.is_patched(peft_model)


def test_unpatch_restores_transformers_numbers():
    ours, ref = lora_pair("gemma3_text")
    ids, labels = random_batch()
    patched_loss = ours(input_ids=ids, labels=labels).loss.item()
    patches.unpatch_model(ours)
    assert rel(ours(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss) < 1e-6
    assert rel(patched_loss, ref(input_ids=ids, labels=labels).loss) < LOSS_RTOL


def test_lora_dropout_and_disabled_adapters_fall_back_to_peft(calls):
    ours, ref = lora_pair("llama", dropout=0.1)
    ours.eval()
    ref.eval()  # dropout inactive in eval: the two must agree, through peft's layers
    ids, labels = random_batch()
    with torch.no_grad():
        assert rel(ours(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss) < LOSS_RTOL
    assert calls["lora_qkv"] == 0 and calls["lora_mlp"] == 0 and calls["lora_linear"] == 0
    ours, ref = lora_pair("llama")
    with torch.no_grad(), ours.disable_adapter(), ref.disable_adapter():
        assert rel(ours(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss) < LOSS_RTOL


def test_partial_targets_mix_fused_and_plain_projections(calls):
    ours, ref = lora_pair("qwen3", targets=["q_proj", "v_proj", "down_proj"])
    assert_loss_and_grads_match(ours, ref, *random_batch())
    assert calls["lora_qkv"] == 0 and calls["lora_linear"] >= 6  # q, v, down per layer


def test_gemma3_multimodal_lora_targets_language_model_only():
    ours, _ = lora_pair("gemma3")
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert names and all("language_model" in n for n in names)
    assert not any("vision" in n for n in names)


def test_bnb_4bit_base_on_cpu(tmp_path, calls):
    """A bitsandbytes 4-bit base (its CPU backend): the fused LoRA path dequantizes it with
    nbtune's NF4 kernel; loss and gradients match peft over bitsandbytes."""
    import copy

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from tiny_models import randomize_lora_b

    tiny_model("llama").save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    ref_base = copy.deepcopy(base)
    ours = nbtune.add_lora(base, r=4, alpha=8, seed=1)
    ref = nbtune.add_lora(ref_base, r=4, alpha=8, seed=1, patch=False, gradient_checkpointing="off")
    randomize_lora_b(ours)
    randomize_lora_b(ref)
    assert_loss_and_grads_match(ours, ref, *random_batch())
    assert calls["lora_qkv"] >= 2 and calls["lora_mlp"] >= 2


def test_registry_covers_the_issue_list():
    assert set(patches.SUPPORTED_MODEL_TYPES) == {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3"}
    assert set(FAMILIES) <= set(patches.SUPPORTED_MODEL_TYPES)
