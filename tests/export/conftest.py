"""Fixtures for the export tests: the embedded model re-saved in several small shards, a LoRA
adapter on it with non-zero B (so the merge changes every adapted weight), and a small random
Llama saved pre-quantized in bitsandbytes NF4 with its adapter."""
import warnings

import pytest
import torch

SHARD = "60MB"  # the embedded model (270 MB in bf16) is saved in 5 shards of at most this


def random_adapter(model, out, r=8, alpha=16, seed=1, scale=0.02, targets="all-linear"):
    """A LoRA adapter of ``model`` with random A and B (B is zero at init: the merge would be a no-op)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sharded_base(tmp_path_factory, smollm2_dir):
    """SmolLM2-135M-Instruct in bf16, saved in shards of at most 60 MB, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("smollm2-sharded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).save_pretrained(
            path, max_shard_size=SHARD)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_adapter(tmp_path_factory, sharded_base):
    """A random-B LoRA adapter (r 8, all linear layers) on the sharded base, with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("smollm2-adapter")
    random_adapter(AutoModelForCausalLM.from_pretrained(sharded_base, dtype=torch.float32), path)
    AutoTokenizer.from_pretrained(sharded_base).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def nf4_base(tmp_path_factory):
    """(16-bit dir, NF4 dir, adapter dir): a random 2-layer Llama (hidden 96: rows of 96 values do not
    fill whole 64-value blocks) in bf16, the same saved pre-quantized NF4 with double quantization
    by transformers + bitsandbytes, and a random-B adapter."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("nf4")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "bf16")
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        AutoModelForCausalLM.from_pretrained(root / "bf16", quantization_config=quant, device_map="cpu",
                                             dtype=torch.bfloat16).save_pretrained(root / "nf4")
    random_adapter(AutoModelForCausalLM.from_pretrained(root / "bf16", dtype=torch.float32), root / "adapter",
                   scale=0.05)
    return root / "bf16", root / "nf4", root / "adapter"
