"""The exported GGUF files run in a real llama.cpp (through llama-cpp-python) and predict what the
peft model predicts: next-token argmax over a GSM8K prompt (>= 99% of positions for f16, >= 95% for
q8_0), greedy generation, tokenization, and the logits of small random models of each supported
architecture (LoRA on every linear layer, merged). llama-cpp-python builds llama.cpp from source
(no wheel on PyPI), so it is not in the test extra: these tests are ``slow`` and skip without it,
except where ``NBTUNE_REQUIRE_LLAMA_CPP=1`` (CI, which installs it with .ci/llama_cpp) makes its
absence a failure."""
import json
import os

import numpy as np
import pytest
import torch

from nbtune.export.gguf_export import export_gguf

from .conftest import random_adapter
from .gguf_fields import field_value

if os.environ.get("NBTUNE_REQUIRE_LLAMA_CPP") == "1":
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow


def _llama(path, n_ctx=1024, quantized=False):
    # llama-cpp-python 0.3.36 built from source on an AVX-512 machine crashes (SIGSEGV) in batched
    # matrix products with quantized weights, for llama.cpp's own Q4_1 file of the embedded model too;
    # one token per batch takes the matrix-vector path, which works: quantized files are read so
    batch = dict(n_batch=1, n_ubatch=1) if quantized else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0,
                           **batch)


def _llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _gsm8k_chat(tokenizer) -> str:
    from nbtune.assets import pull_dataset

    row = json.loads((pull_dataset("gsm8k") / "test.jsonl").read_text().splitlines()[0])
    return tokenizer.apply_chat_template([{"role": "user", "content": row["question"]},
                                          {"role": "assistant", "content": row["answer"]}], tokenize=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sharded_base, smollm2_adapter):
    out = tmp_path_factory.mktemp("gguf-llama")
    return {q: export_gguf(sharded_base, smollm2_adapter, out, quant=q, name="smollm2-test") for q in ("f16", "q8_0")}


@pytest.fixture(scope="module")
def peft_model(sharded_base, smollm2_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sharded_base, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(smollm2_adapter)).eval()


def test_next_token_argmax_agrees_with_peft(exported, peft_model, smollm2_adapter):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_adapter)
    text = _gsm8k_chat(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = peft_model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
    for quant, need in (("f16", 0.99), ("q8_0", 0.95)):
        llm = _llama(exported[quant], quantized=quant != "f16")
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # llama.cpp tokenizes as HF does
        got = _llama_logits(llm, ids).argmax(-1)
        agree = float((got == want).mean())
        print(f"llama.cpp {quant}: next-token argmax agrees with the peft model on {agree:.1%} of {len(ids)} positions")
        assert agree >= need, quant
        del llm


def test_greedy_generation_matches_transformers(exported, sharded_base, smollm2_adapter, tmp_path):
    """f16: llama.cpp's greedy continuation equals transformers' on the same (f16-rounded) merged weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbtune.export.merged import export_merged

    merged = export_merged(sharded_base, smollm2_adapter, tmp_path / "merged", dtype="float16")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Answer briefly."}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = 24
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    llm = _llama(exported["f16"])
    got = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        got.append(tok)
        if len(got) == n:
            break
    assert got == want, (tokenizer.decode(got), tokenizer.decode(want))


ARCH_CONFIGS = {  # sliding windows longer than the test sequence: llama.cpp's window layout rules do not matter
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                                "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 4096, "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", {"sliding_window": 4096}),
}


@pytest.mark.parametrize("family", sorted(ARCH_CONFIGS))
def test_each_architecture_runs_in_llama_cpp(family, smollm2_dir, tmp_path):
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    cls, extra = ARCH_CONFIGS[family]
    cfg = getattr(transformers, cls)(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():  # norms away from their init so that a missing (1 + w) shows
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.2)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    random_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), tmp_path / "adapter",
                   scale=0.1)
    path = export_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", quant="f16", modelfile=False)

    ids = tokenizer("Doctor Jones has 9 inpatients, so his rounds take 9 * 20 minutes.",
                    add_special_tokens=False)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(torch.tensor([ids])).logits[0].numpy()
    got = _llama_logits(_llama(path, n_ctx=128), ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{family}: llama.cpp logits within {err:.2%} of the peft model's (max |logit| {np.abs(want).max():.2f})")
    assert err < 0.03, family
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) >= 0.9, family


def test_k_quant_through_llama_cpp(sharded_base, smollm2_adapter, peft_model, tmp_path):
    """q4_k_m is made by llama.cpp's own quantizer (here llama-cpp-python's llama_model_quantize)
    from a 16-bit GGUF, and still predicts mostly as the peft model does."""
    import gguf
    from transformers import AutoTokenizer

    path = export_gguf(sharded_base, smollm2_adapter, tmp_path, quant="q4_k_m", name="smollm2-test")
    assert path.name == "smollm2-test-q4_k_m.gguf" and list(tmp_path.glob("*.gguf")) == [path]
    reader = gguf.GGUFReader(path)
    assert field_value(reader.fields["general.file_type"]) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q4_K for t in reader.tensors)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_adapter)
    ids = tokenizer(_gsm8k_chat(tokenizer), add_special_tokens=False)["input_ids"][:128]
    with torch.no_grad():
        want = peft_model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
    agree = float((_llama_logits(_llama(path, quantized=True), ids).argmax(-1) == want).mean())
    print(f"llama.cpp q4_k_m: next-token argmax agrees with the peft model on {agree:.1%} of {len(ids)} positions")
    assert agree >= 0.8
