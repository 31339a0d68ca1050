"""GPU: patched vs plain transformers + peft on a 4-bit NF4 base, fp16 and bf16, Triton kernels.

Run on the GPU machine (``pytest -m gpu tests/models``). Tolerances are the kernels' 16-bit ones:
both sides round differently (fused kernels accumulate in fp32, transformers rounds between ops),
so the loss must agree to 1e-2 relative and every LoRA gradient to cosine >= 0.99.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import FAMILIES, WINDOW, cosine, random_batch, randomize_lora_b, tiny_model, word_tokenizer

import nbtune
from nbtune.models import patches

pytestmark = pytest.mark.gpu

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-ckpt")
    paths = {}
    for kind in FAMILIES:
        path = root / kind
        tiny_model(kind).save_pretrained(path)
        word_tokenizer().save_pretrained(path)
        paths[kind] = path
    return paths


def pair_4bit(checkpoints, kind, dtype):
    # Gemma 2: transformers' sdpa path drops the attention softcap; eager applies it, as nbtune does
    attn = "eager" if kind == "gemma2" else "sdpa"

    def load(patch):
        model, _ = nbtune.load_model(str(checkpoints[kind]), max_seq_length=256, load_in_4bit=True, dtype=dtype,
                                     device="cuda", patch=patch, attn_implementation=attn)
        peft_model = nbtune.add_lora(model, r=8, alpha=16, seed=1, patch=patch,
                                     gradient_checkpointing="offload" if patch else "off")
        randomize_lora_b(peft_model)
        return peft_model

    return load(True), load(False)


def check(ours, ref, ours_context=contextlib.nullcontext, **inputs):
    with ours_context():
        loss = ours(**inputs).loss
    ref_loss = ref(**inputs).loss
    assert torch.isfinite(loss) and torch.isfinite(ref_loss)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2, (loss.item(), ref_loss.item())
    with ours_context():
        loss.backward()
    ref_loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert g is not None and g.dtype == torch.float32, name
        assert cosine(g, ref_grads[name]) >= 0.99, name
    return loss


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_4bit_patched_matches_transformers(family, dtype, checkpoints):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    ours, ref = pair_4bit(checkpoints, family, DTYPES[dtype])
    assert patches.is_patched(ours)
    ids, labels = random_batch(length=4 * WINDOW + 3)
    check(ours, ref, input_ids=ids.cuda(), labels=labels.cuda())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_4bit_packing_matches_transformers(dtype, checkpoints):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    ours, ref = pair_4bit(checkpoints, "qwen2", DTYPES[dtype])
    lengths = [11, 1, 2 * WINDOW + 3, 6]
    ids = torch.randint(3, 120, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[position_ids == 0] = -100
    check(ours, ref, input_ids=ids.cuda(), position_ids=position_ids.cuda(), labels=labels.cuda(), use_cache=False)


def test_memory_efficient_sdpa_only_t4_emulation(checkpoints):
    """A T4 runs only SDPA's memory-efficient kernel (no flash, no GQA there): the patched path must
    not depend on flash (GQA by repeating k/v), in fp16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ours, ref = pair_4bit(checkpoints, "llama", torch.float16)
    ids, labels = random_batch(length=64)
    # Only nbtune runs restricted: transformers' own sdpa path passes GQA k/v, which that kernel refuses.
    check(ours, ref, ours_context=lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION),
          input_ids=ids.cuda(), labels=labels.cuda())


def test_generation_runs_on_the_patched_4bit_model(checkpoints):
    """Generation runs, and the prompt's logits and a decoding step's (the NF4 matmul) match transformers."""
    ours, ref = pair_4bit(checkpoints, "gemma2", torch.float16)
    ours.eval()
    ref.eval()
    prompt = torch.randint(3, 120, (2, 9)).cuda()
    with torch.no_grad():
        got = ours.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        logits = ours(input_ids=prompt).logits
        ref_logits = ref(input_ids=prompt).logits
    assert got.shape == (2, 17)
    assert cosine(logits.float(), ref_logits.float()) > 0.999
    # one decoding step over the KV cache: 2 tokens, so every 4-bit projection runs nbtune's NF4 matmul
    step = torch.randint(3, 120, (2, 1)).cuda()
    with torch.no_grad():
        steps = [model(input_ids=step, past_key_values=model(input_ids=prompt, use_cache=True).past_key_values,
                       use_cache=True).logits for model in (ours, ref)]
    assert cosine(steps[0].float(), steps[1].float()) > 0.999
