"""Fixtures for the bad-input tests: a tiny random Llama checkpoint, a small data file, and a
"previous run" output folder whose every byte must survive a rejected run."""
import json
import warnings

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from nbtune.assets import pull_model

    return pull_model("smollm2-135m-instruct", quiet=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """A randomly initialised 2-layer Llama (hidden 64, max_position_embeddings 512) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [{"prompt": f"What is {i}+{i}?", "completion": f"{i}+{i} = {2 * i}."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name": str(model_dir), "max_seq_length": 64},
        "data": {"source": str(data), "eval_split": None},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 1, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0,
                  "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 1, **train},
        "output": {"dir": str(out)},
    }
