"""The tokenizer as GGUF metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

Two families, told apart by the tokenizer's own ``tokenizer.json``:

- byte-level BPE (GPT-2 style: Llama 3, Qwen, SmolLM, Mistral Nemo): ``tokenizer.ggml.model =
  gpt2``, the tokens as the vocabulary spells them, the merges, and ``tokenizer.ggml.pre``, the
  name of llama.cpp's pre-tokenizer (the regex that splits text before BPE), recognised from the
  ``pre_tokenizer`` section: plain GPT-2 (``gpt-2``), digits split one by one before GPT-2
  (``smollm``), Llama 3's (``llama-bpe``), Qwen 2's (``qwen2``), Tekken (``tekken``);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B, Gemma, Phi-3):
  ``tokenizer.ggml.model = llama``, tokens with ``▁`` for spaces, ``<0xNN>`` byte tokens typed
  BYTE, and scores that rank merges: llama.cpp's SentencePiece tokenizer merges the adjacent pair
  whose joined text has the highest score, which reproduces BPE when the token made by merge
  number ``k`` scores ``-k``.

Added tokens are CONTROL when special, USER_DEFINED otherwise; ids the tokenizer does not use up
to the embedding's row count are ``[PAD<i>]`` (UNUSED). Special ids and whether a BOS/EOS is
added are taken from how the tokenizer really encodes, not from flags that may be stale. Other
tokenizers (Unigram, WordPiece, an unknown pre-tokenizer) are refused with a message.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .adapter import ExportError

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
LLAMA3_DIGITS, QWEN2_DIGITS = r"\p{N}{1,3}", r"\p{N}|"
LETTERS = r"[^\r\n\p{L}\p{N}]?\p{L}+"
TEKKEN = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"


def _walk(node):
    """Every component of a (possibly nested Sequence) tokenizers section."""
    if not isinstance(node, dict):
        return
    yield node
    for key in ("pretokenizers", "normalizers", "decoders"):
        for child in node.get(key) or []:
            yield from _walk(child)


def _regex(node) -> str:
    pattern = node.get("pattern") or {}
    return pattern.get("Regex") or pattern.get("String") or ""


def bpe_pre_name(tok_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json``."""
    parts = list(_walk(tok_json.get("pre_tokenizer")))
    types = [p.get("type") for p in parts]
    splits = [_regex(p) for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    digits = [p for p in parts if p.get("type") == "Digits"]
    if splits:
        regex = splits[0]
        if TEKKEN in regex:
            return "tekken"
        if LETTERS in regex and LLAMA3_DIGITS in regex:
            return "llama-bpe"
        if LETTERS in regex and QWEN2_DIGITS in regex:
            return "qwen2"
    elif byte_level and byte_level[0].get("use_regex", True):
        if not digits and types == ["ByteLevel"]:
            return "gpt-2"
        if digits and digits[0].get("individual_digits") and set(types) <= {"Sequence", "Digits", "ByteLevel"}:
            return "smollm"
    raise ExportError(
        "GGUF export: the tokenizer's pre-tokenizer (tokenizer.json 'pre_tokenizer': "
        f"{json.dumps(tok_json.get('pre_tokenizer'))[:300]}) is not one nbtune can name for llama.cpp (known: GPT-2, "
        "SmolLM digits, Llama 3, Qwen 2, Tekken); llama.cpp would split text differently from the model's tokenizer. "
        "Export format 'merged' and convert it with llama.cpp's convert_hf_to_gguf.py")


def _is_byte_level(tok_json: dict) -> bool:
    return any(p.get("type") == "ByteLevel" for p in _walk(tok_json.get("pre_tokenizer")))


def _adds_space_prefix(tok_json: dict) -> bool:
    for node in _walk(tok_json.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == "▁":
            return True
    for node in _walk(tok_json.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") != "never"
    return False


def write_vocab(writer, tokenizer_dir, n_vocab: int) -> dict:
    """Write the tokenizer of ``tokenizer_dir`` into ``writer``; returns what the Modelfile needs:
    ``{"tokenizer": the transformers tokenizer, "eot": end-of-turn token text or None}``."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"GGUF export: {str(tokenizer_dir)!r} has no tokenizer.json (a fast tokenizer); nbtune "
                          "writes the GGUF vocabulary from it")
    tok_json = json.loads(path.read_text(encoding="utf-8"))
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export: a {model.get('type')} tokenizer cannot be written by nbtune's GGUF writer "
                          "(BPE tokenizers can)")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    for a in added.values():
        vocab.setdefault(a["content"], a["id"])
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"GGUF export: the tokenizer has token id {max(vocab.values())} but the model's embedding "
                          f"has {n_vocab} rows; the tokenizer does not belong to this model")
    by_id = {i: t for t, i in vocab.items()}
    byte_level = _is_byte_level(tok_json)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    scores = [0.0] * n_vocab
    if not byte_level:
        if not model.get("byte_fallback"):
            raise ExportError("GGUF export: a BPE tokenizer that is neither byte-level nor SentencePiece-style (byte "
                              "fallback) cannot be written by nbtune's GGUF writer")
        for rank, merge in enumerate(merges):  # merge k makes token a+b: SentencePiece score -k
            made = merge.replace(" ", "", 1) if isinstance(merge, str) else "".join(merge)
            if made in vocab and scores[vocab[made]] == 0.0:
                scores[vocab[made]] = -float(rank + 1)
    tokens, types = [], []
    unk = tokenizer.unk_token
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = gguf.TokenType.BYTE
        elif text == unk and not byte_level:
            kind = gguf.TokenType.UNKNOWN
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(text)
        types.append(kind)
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre_name(tok_json))
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_adds_space_prefix(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not byte_level:
        writer.add_token_scores(scores)
    else:
        writer.add_token_merges(merges)

    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and 0 <= tid < n_vocab:
            getattr(writer, f"add_{kind}_token_id")(tid)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and len(with_special) > len(plain)
                                  and with_special[0] == tokenizer.bos_token_id))
    writer.add_add_eos_token(bool(tokenizer.eos_token_id is not None and len(with_special) > len(plain)
                                  and with_special[-1] == tokenizer.eos_token_id))
    eot = next((t for t in END_OF_TURN if t in vocab), None)
    if eot is not None:
        writer.add_eot_token_id(vocab[eot])
    if getattr(tokenizer, "chat_template", None):
        template = tokenizer.chat_template
        writer.add_chat_template(template if isinstance(template, str) else json.dumps(template))
    return {"tokenizer": tokenizer, "eot": eot}
