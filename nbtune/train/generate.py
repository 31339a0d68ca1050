"""After training: generate / chat with the trained adapter, save the adapter and a merged checkpoint.

    result.generate("Tom has 3 apples ...")          # one reply, text
    chat = result.chat(); chat("hi"); chat("and?")    # a conversation that keeps its history
    result.save_adapter("my-adapter")                # peft format: PeftModel.from_pretrained loads it
    result.save_merged("my-merged")                  # 16-bit checkpoint with the adapter folded in

Generation renders the conversation with the tokenizer's chat template (the one training used),
decodes greedily unless ``temperature > 0``, and stops at the template's end-of-turn token.
The merged checkpoint is built from the base checkpoint's own weights (read shard by shard on the
CPU, see :mod:`nbtune.export.merged`), never from the 4-bit training model: merging into NF4
weights would round the adapter away.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _stop_ids(tokenizer) -> list[int]:
    ids = []
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", tokenizer.eos_token):
        if tok and tok in tokenizer.get_vocab():
            ids.append(tokenizer.convert_tokens_to_ids(tok))
    return list(dict.fromkeys(ids))


@torch.no_grad()
def generate(model, tokenizer, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             system_prompt: str | None = None, stream: bool = False) -> str:
    """One reply to ``prompt`` (text, or a list of chat messages) from ``model``; returns the text."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(_device_of(model))
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", True)
    model.config.use_cache = True
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=_stop_ids(tokenizer),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        out = model.generate(**enc, **kwargs)
    finally:
        model.config.use_cache = use_cache
        if was_training:
            model.train()
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class Chat:
    """A conversation with a model: ``chat("hi")`` returns the reply and keeps the history."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, **generate_kwargs):
        self.model, self.tokenizer = model, tokenizer
        self.messages: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.generate_kwargs = generate_kwargs

    def __call__(self, text: str, **kwargs) -> str:
        self.messages.append({"role": "user", "content": text})
        reply = generate(self.model, self.tokenizer, self.messages, **{**self.generate_kwargs, **kwargs})
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def __repr__(self) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages) or "(empty chat)"


def save_adapter(peft_model, tokenizer, path) -> Path:
    """The adapter in peft format (safetensors) with the tokenizer beside it."""
    path = Path(path)
    peft_model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_merged(adapter_dir, path, base: str, dtype: str = "float16", trust_remote_code: bool = False) -> Path:
    """A merged 16-bit checkpoint: the adapter at ``adapter_dir`` folded into ``base``'s weights,
    written as safetensors shard by shard with the tokenizer (:func:`nbtune.export.export_merged`).

    Memory stays near one row block of one tensor (plus one dequantized weight for a bnb-4bit
    base), not the model: an 8B model merges within a free Colab session's 12.7 GB RAM."""
    from ..export.api import base_folder
    from ..export.merged import export_merged

    print(f"nbtune: merging {adapter_dir} into a {dtype} copy of {base} (CPU, shard by shard)", file=sys.stderr)
    return export_merged(base_folder(base, trust_remote_code), adapter_dir, Path(path), dtype=dtype)
