"""Batch shapes the patched training path must get right, per family, fp32 on CPU: greedy
generation after a training step gives transformers' tokens (left-padded prompts, KV cache: the
fallback path), padding-free packing gives each sequence the loss it has alone (and transformers'
packed loss), a right-padded batch gives the unpadded losses.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import (LOSS_RTOL, WINDOW, assert_grads_match, lora_grads, lora_pair, random_batch, randomize_lora_b,
                         reference_inputs, rel, sgd_step, tiny_model)

from nbtune.models.patches import attention

# the module shares its name with the function nbtune.kernels exports: take it by name
varlen_module = importlib.import_module("nbtune.kernels.varlen_attention")

# ----------------------------------------------------------------------------- generation
def test_generation_after_training_matches_transformers(family):
    ours, ref = lora_pair(family)
    ids, labels = random_batch()
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    sgd_step(ours, ids, labels)
    trained = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    assert all((trained[n] != before[n]).any() for n in trained), "the training step left a LoRA weight unchanged"
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(trained[n])
    ours.eval()
    ref.eval()
    # a left-padded batch of two prompts: transformers' masks, KV cache, the patched layers inside
    prompt = ids[:, :9].clone()
    mask = torch.ones_like(prompt)
    prompt[1, :3], mask[1, :3] = 0, 0
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        got = ours.generate(input_ids=prompt, attention_mask=mask, **options)
        want = ref.generate(input_ids=prompt, attention_mask=mask, **options)
    assert got.shape == want.shape == (2, 15)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_the_kv_cache_is_taken_under_either_name(name):
    """transformers 5.24 renamed the KV cache argument ``past_key_values`` to ``cache``; a caller of
    the patched model may use either, on any release: the cache fills for every layer and the next
    token's logits are transformers' own."""
    from transformers import DynamicCache

    ours, ref = lora_pair("llama")
    ours.eval()
    ref.eval()
    ids, _ = random_batch(batch=1, length=7)
    with torch.no_grad():
        cache = DynamicCache(config=ours.config)
        ours(input_ids=ids[:, :6], use_cache=True, **{name: cache})
        assert cache.get_seq_length() == 6
        got = ours(input_ids=ids[:, 6:], use_cache=True, **{name: cache}).logits
        assert cache.get_seq_length() == 7
        want = ref(input_ids=ids, use_cache=False).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="passed twice"):
        ours(input_ids=ids, past_key_values=DynamicCache(config=ours.config), cache=DynamicCache(config=ours.config))


# ----------------------------------------------------------------------------- packing and padding
def _packed(seqs):
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    labels = ids.clone()
    labels[position_ids == 0] = -100  # as TRL's padding-free collator: never predict across a boundary
    cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    return ids, position_ids, labels, cu


def _sequences(seed=5, lengths=(11, 1, 2 * WINDOW + 3, 6)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (n,), generator=generator) for n in lengths]


def _per_sequence_loss(model, seqs):
    """Token-weighted mean of each sequence's loss computed alone (length-1 sequences have none)."""
    total, count = 0.0, 0
    for s in seqs:
        if len(s) < 2:
            continue
        total = total + model(input_ids=s[None], labels=s[None]).loss * (len(s) - 1)
        count += len(s) - 1
    return total / count


def test_padding_free_packing_equals_each_sequence_alone(family):
    ours, ref = lora_pair(family)
    seqs = _sequences()
    ids, position_ids, labels, cu = _packed(seqs)
    packed = ours(input_ids=ids, position_ids=position_ids, labels=labels).loss
    alone = _per_sequence_loss(ours, seqs)
    assert rel(packed, alone) < LOSS_RTOL, (packed.item(), alone.item())
    # TRL passes the boundaries too (cu_seq_lens_q/k for varlen kernels): same answer
    with_cu = ours(input_ids=ids, position_ids=position_ids, labels=labels, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=int(cu.diff().max()), max_length_k=int(cu.diff().max())).loss
    assert rel(with_cu, alone) < LOSS_RTOL
    # transformers detects packing from position_ids only without a cache (use_cache=False, as TRL sets)
    ref_packed = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False,
                     **reference_inputs(ref, ids)).loss
    assert rel(packed, ref_packed) < LOSS_RTOL
    packed.backward()
    ref_packed.backward()
    assert_grads_match(ours, ref)


def test_right_padded_batch_equals_unpadded(family):
    _assert_right_padded_equals_unpadded(family)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_right_padded_batch_through_the_varlen_kernel_in_the_interpreter(kind, count_calls, monkeypatch):
    """``NBTUNE_PADDED_ATTENTION=varlen``: right-padded rows take the packed backend's one launch,
    each row's real tokens one sequence, the pads one token each (Triton's interpreter on CPU)."""
    monkeypatch.setenv("NBTUNE_KERNELS", "reference")
    monkeypatch.setenv(attention.PADDED_ATTENTION_ENV, "varlen")
    monkeypatch.setattr(attention, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(varlen_module, "use_triton", lambda *tensors: True)
    calls = count_calls(attention, ["_attend_pieces", "_attend_varlen"])
    _assert_right_padded_equals_unpadded(kind)
    assert calls["_attend_varlen"] >= 2 and calls["_attend_pieces"] == 0


def _assert_right_padded_equals_unpadded(family):
    ours, ref = lora_pair(family)
    seqs = _sequences(lengths=(2 * WINDOW + 5, 9, 2 * WINDOW + 1))
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)], labels[i, :len(s)] = s, 1, s
    padded = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    alone = _per_sequence_loss(ours, seqs)
    ref_padded = ref(input_ids=ids, attention_mask=mask, labels=labels, **reference_inputs(ref, ids)).loss
    assert rel(padded, alone) < LOSS_RTOL and rel(padded, ref_padded) < LOSS_RTOL
    padded.backward()
    ref_padded.backward()
    assert_grads_match(ours, ref)


# ----------------------------------------------------------------------------- packed row == documents apart
# Llama (GQA), Qwen3 (q/k norms, one sliding layer), Mistral (sliding window shorter than a
# document), Gemma 2 (logit softcapping on top of the window)
PACKING_FAMILIES = ["llama", "qwen3", "mistral", "gemma2"]


def _summed_loss_and_grads(model, seqs, packed: bool, device="cpu"):
    """Token-summed loss of the sequences and the LoRA gradients of that sum: in one packed row
    (padding-free, position_ids restarting) or each sequence as its own batch."""
    model.zero_grad(set_to_none=True)
    if packed:
        ids, position_ids, labels, _ = (t.to(device) for t in _packed(seqs))
        n = int((labels[:, 1:] != -100).sum())
        total = model(input_ids=ids, position_ids=position_ids, labels=labels).loss * n
    else:
        total = sum(model(input_ids=s[None].to(device), labels=s[None].to(device)).loss * (len(s) - 1)
                    for s in seqs if len(s) > 1)
    total.backward()
    return total.detach().float(), lora_grads(model)


def _assert_packed_equals_apart(model, seqs, device="cpu", loss_rtol=LOSS_RTOL, grad_rtol=1e-4):
    packed, packed_grads = _summed_loss_and_grads(model, seqs, True, device)
    apart, apart_grads = _summed_loss_and_grads(model, seqs, False, device)
    assert rel(packed, apart) < loss_rtol, (packed.item(), apart.item())
    assert packed_grads.keys() == apart_grads.keys() and packed_grads
    for name, g in packed_grads.items():
        want = apart_grads[name].float()
        scale = want.abs().max().item()
        assert scale > 0, f"{name}: zero gradient (the test would prove nothing)"
        torch.testing.assert_close(g.float() / scale, want / scale, rtol=grad_rtol, atol=grad_rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", PACKING_FAMILIES)
def test_packed_row_equals_documents_apart(kind, count_calls):
    """CPU, the reference path: one SDPA (or softcapped attention) per document."""
    ours, _ = lora_pair(kind)
    calls = count_calls(attention, ["_attend_pieces", "_attend_varlen"])
    _assert_packed_equals_apart(ours, _sequences(lengths=(11, 1, 2 * WINDOW + 3, 6, 1, 1, 2 * WINDOW)))
    assert calls["_attend_pieces"] > 0 and calls["_attend_varlen"] == 0


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_packed_row_through_the_varlen_kernel_in_the_interpreter(kind, count_calls, monkeypatch):
    """The patched attention's one-launch path: the Triton varlen kernel, run by Triton's interpreter
    on CPU tensors (the other kernels keep their reference path, to keep the test short)."""
    monkeypatch.setenv("NBTUNE_KERNELS", "reference")
    monkeypatch.setattr(attention, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(varlen_module, "use_triton", lambda *tensors: True)
    ours, _ = lora_pair(kind)
    calls = count_calls(attention, ["_attend_pieces", "_attend_varlen"])
    seqs = _sequences(lengths=(11, 1, 2 * WINDOW + 3, 6))
    _assert_packed_equals_apart(ours, seqs)
    # every layer's packed attention (forward, and its recompute under checkpointing); the documents
    # apart are unpacked rows, which never take the packed path
    assert calls["_attend_varlen"] >= 2 and calls["_attend_pieces"] == 0


# ----------------------------------------------------------------------------- the same on the GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", PACKING_FAMILIES)
def test_gpu_packed_row_equals_documents_apart(kind, kernel_mode, count_calls, monkeypatch):
    """CUDA, NBTUNE_KERNELS=auto, fp32: packed rows take the varlen Triton kernel (the default
    backend), documents apart take SDPA. (16-bit inputs: tests/kernels/test_varlen_attention.py.)"""
    kernel_mode("auto")
    monkeypatch.delenv(attention.PACKED_ATTENTION_ENV, raising=False)
    import nbtune

    ours = nbtune.add_lora(tiny_model(kind).cuda(), r=4, alpha=8, seed=1)
    randomize_lora_b(ours)
    calls = count_calls(attention, ["_attend_pieces", "_attend_varlen"])
    seqs = _sequences(lengths=(11, 1, 2 * WINDOW + 3, 6, 1, 1, 40, 2 * WINDOW))
    _assert_packed_equals_apart(ours, seqs, device="cuda", loss_rtol=1e-4, grad_rtol=1e-3)
    assert calls["_attend_varlen"] > 0 and calls["_attend_pieces"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_gpu_right_padded_batch_by_each_backend(kind, kernel_mode, count_calls, monkeypatch):
    """CUDA, NBTUNE_KERNELS=auto, fp32: a right-padded batch gives the same loss and LoRA gradients
    through SDPA without cuDNN (the default), the varlen kernel, and SDPA as torch picks it."""
    kernel_mode("auto")
    monkeypatch.delenv(attention.PACKED_ATTENTION_ENV, raising=False)
    monkeypatch.delenv(attention.PADDED_ATTENTION_ENV, raising=False)
    import nbtune

    ours = nbtune.add_lora(tiny_model(kind).cuda(), r=4, alpha=8, seed=1)
    randomize_lora_b(ours)
    seqs = _sequences(lengths=(2 * WINDOW + 5, 9, 40, 2 * WINDOW + 1))
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    labels = ids.masked_fill(mask == 0, -100)
    ids, mask, labels = ids.cuda(), mask.cuda(), labels.cuda()

    def loss_and_grads():
        ours.zero_grad(set_to_none=True)
        loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), lora_grads(ours)

    assert attention.padded_attention_backend(ids.float()) == "flash"
    flash_loss, flash_grads = loss_and_grads()
    calls = count_calls(attention, ["_attend_pieces", "_attend_varlen"])
    monkeypatch.setenv(attention.PADDED_ATTENTION_ENV, "varlen")
    varlen_loss, varlen_grads = loss_and_grads()
    assert calls["_attend_varlen"] > 0 and calls["_attend_pieces"] == 0
    monkeypatch.setenv(attention.PADDED_ATTENTION_ENV, "sdpa")
    sdpa_loss, sdpa_grads = loss_and_grads()
    for loss, grads in ((varlen_loss, varlen_grads), (sdpa_loss, sdpa_grads)):
        assert rel(loss, flash_loss) < 1e-4
        for name, g in grads.items():
            scale = flash_grads[name].abs().max().item()
            assert scale > 0, f"{name}: zero gradient"
            torch.testing.assert_close(g / scale, flash_grads[name] / scale, rtol=1e-3, atol=1e-3)
