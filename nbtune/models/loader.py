"""Load a causal LM and its tokenizer from an embedded name, a local directory or a hub id.

4-bit NF4 with double quantization on CUDA by default (the QLoRA recipe); on a CPU the model
loads in fp32 (bitsandbytes' 4-bit training path needs a GPU). dtype "auto" is fp16 below compute
capability 8.0 (T4: no bf16), bf16 from 8.0 on, fp32 on a CPU.

Pre-quantized bitsandbytes checkpoints (their config.json carries a ``quantization_config`` with
``quant_method: bitsandbytes``, e.g. the ``*-bnb-4bit`` repos) load as they are stored, on any
device (bitsandbytes has a CPU backend), without a new BitsAndBytesConfig; their 4-bit layers'
compute dtype is then set to the dtype chosen here (a checkpoint saved on an A100 says bfloat16,
which a T4 cannot run natively).

``patch`` records whether ``add_lora`` installs nbtune's architecture patches on this model
(None: yes unless the environment says ``NBTUNE_PATCH=0``); ``patch=False`` gives the plain
transformers + peft path for A/B comparisons.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

from .. import quiet
from ..assets import MODELS, pull_model

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


class ModelLoadError(ValueError):
    """A model that cannot be loaded as asked; the message says why and what to do."""


def resolve_model_path(name_or_path: str) -> str:
    """Embedded name -> its cached checkpoint (pulled once); local directory -> itself; else a hub id."""
    if name_or_path in MODELS:
        return str(pull_model(name_or_path))
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model: {str(path)!r} is a directory without config.json; not a checkpoint")
        return str(path)
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not an org/name hub id
        raise ModelLoadError(
            f"model.name: path {str(name_or_path)!r} does not exist. Give a local checkpoint directory, a hub id "
            f"(org/name), or an embedded name: {', '.join(MODELS)}"
        )
    if "/" not in text:  # neither embedded, nor a local directory, nor an org/name hub id
        import difflib

        close = difflib.get_close_matches(text, list(MODELS), n=1)
        raise ModelLoadError(
            f"model.name: unknown model name {text!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f". Embedded names: {', '.join(MODELS)}; or give a local checkpoint directory (a path with "
            f"config.json) or a hub id as org/name (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)"
        )
    return str(name_or_path)


def check_model_name(name_or_path: str) -> None:
    """The checks of :func:`resolve_model_path` that need no download: a clear error for an unknown
    name or a missing path, before anything is loaded or written."""
    if str(name_or_path) in MODELS:
        return
    resolve_model_path(name_or_path)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# a tokenizer's vocabulary: fast (tokenizer.json), sentencepiece (*.model), BPE / WordPiece vocab files, tiktoken
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
               "vocab.txt")


def check_checkpoint_files(folder) -> None:
    """A local checkpoint folder holds what nbtune loads from it, or a :class:`ModelLoadError` saying
    what is missing and how to get it, before anything is loaded: weights as safetensors (nbtune
    never unpickles weights: a pickle file can run code when it is loaded) and a tokenizer."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir() if p.is_file()}
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ModelLoadError(
                f"model.name: {str(folder)!r} holds its weights only as pickle files ({', '.join(pickles)}); nbtune "
                "loads safetensors only, because loading a pickle file can run code hidden in it. Convert it once, "
                "in an environment you trust with this file: load it yourself with transformers "
                f"(AutoModelForCausalLM.from_pretrained({str(folder)!r})) and save it with "
                f"save_pretrained({str(folder)!r}, safe_serialization=True), which writes model.safetensors beside "
                "it; or use a copy of the model that is published as safetensors")
        raise ModelLoadError(
            f"model.name: {str(folder)!r} has no weights: no *.safetensors file beside its config.json. Give the "
            "folder that save_pretrained wrote (config.json and model.safetensors or model-*.safetensors)")
    if not (names & set(VOCAB_FILES) or any(n.endswith(".tiktoken") for n in names)):
        missing = [n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") if n not in names]
        raise ModelLoadError(
            f"model.name: {str(folder)!r} has no tokenizer: none of {', '.join(missing)} is there (nor vocab.json / "
            "vocab.txt). nbtune loads the tokenizer from the model's folder. Fix: save the tokenizer of the model "
            "these weights came from into it: AutoTokenizer.from_pretrained('<that model>')"
            f".save_pretrained({str(folder)!r})")


def model_seq_limit(cfg: dict) -> int | None:
    """The longest sequence a checkpoint's config.json allows (max_position_embeddings), if it says."""
    return cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")


def check_seq_length(max_seq_length: int, cfg: dict, where: str = "this model") -> None:
    limit = model_seq_limit(cfg)
    if limit and max_seq_length > limit:
        raise ModelLoadError(
            f"model.max_seq_length={max_seq_length} is above the limit of {where}: {limit} tokens "
            f"(max_position_embeddings in its config.json); allowed: 1..{limit}")


def from_broken_bitsandbytes(exc: BaseException) -> bool:
    """True when ``exc`` was raised while importing bitsandbytes (peft and transformers import it
    whenever it is installed, so a broken install breaks their import)."""
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] == "bitsandbytes":
        return True
    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}bitsandbytes{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def bitsandbytes_error(exc: BaseException, why: str = "4-bit loading") -> ModelLoadError:
    if why == "training":  # bitsandbytes is there but fails to import, and takes peft / transformers with it
        return ModelLoadError(
            f"bitsandbytes is installed but broken ({type(exc).__name__}: {exc}), and transformers / peft "
            "import it, so nothing can train. Fix: pip install -U bitsandbytes (then restart the kernel); "
            "or pip uninstall bitsandbytes and train without 4-bit (model.load_in_4bit: false)")
    missing = isinstance(exc, ImportError) and exc.name == "bitsandbytes"  # not installed (or blocked)
    # an installed but broken bitsandbytes is imported by transformers / peft wherever they can use it
    # (in some of their versions at import): training without it then needs it uninstalled
    without = "train without it" if missing else "pip uninstall bitsandbytes and train without it"
    return ModelLoadError(
        f"{why} needs bitsandbytes, which is missing or broken ({type(exc).__name__}: {exc}). Fix: "
        f"pip install -U bitsandbytes (then restart the kernel); or {without}: "
        "model.load_in_4bit: false and train.optimizer: adamw")


def require_bitsandbytes(why: str = "4-bit loading") -> None:
    """Import bitsandbytes, or a :class:`ModelLoadError` with the fix when it is missing or broken."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (missing CUDA library, ...)
        raise bitsandbytes_error(e, why) from None


def choose_dtype(requested, capability: tuple[int, int] | None) -> tuple[torch.dtype, str | None]:
    """The compute dtype for ``requested`` ("auto", a name or a torch dtype) on a device of CUDA
    compute ``capability`` (None: a CPU), and a note when it is not what was asked for.

    "auto": fp32 on a CPU, fp16 below compute capability 8.0 (T4: no bf16), bf16 from 8.0 on.
    bf16 asked for on a GPU below 8.0 falls back to fp16 (trained with loss scaling), with a note.
    """
    if requested in (None, "auto"):
        if capability is None:
            return torch.float32, None
        return (torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16), None
    if isinstance(requested, torch.dtype):
        chosen = requested
    elif str(requested) in DTYPES:
        chosen = DTYPES[str(requested)]
    else:
        raise ModelLoadError(f"model.dtype: {requested!r} is not one of auto, float16, bfloat16, float32")
    if chosen == torch.bfloat16 and capability is not None and tuple(capability) < (8, 0):
        major, minor = capability
        return torch.float16, (f"model.dtype: bfloat16 was asked for, but this GPU (compute capability {major}.{minor}) "
                               "has no bf16; training in float16 with loss scaling instead")
    return chosen, None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) CUDA compute capability of ``device``; None for a CPU."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """:func:`choose_dtype` for ``device``; its note, if any, goes to stderr."""
    chosen, note = choose_dtype(dtype, device_capability(device))
    if note:
        print(f"nbtune: {note}", file=sys.stderr)
    return chosen


def read_config(path_or_id: str) -> dict:
    local = Path(path_or_id) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path_or_id).to_dict()


def load_model(
    name_or_path: str | None = None,
    max_seq_length: int = 2048,
    load_in_4bit: bool | None = None,
    dtype=None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    patch: bool | None = None,
):
    """(model, tokenizer) ready for LoRA training; see the module docstring for the defaults."""
    quiet.apply()  # before transformers imports bitsandbytes (nbtune/quiet.py)
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    name_or_path = name_or_path or next(iter(MODELS))
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        check_checkpoint_files(path)
    else:  # a hub id: fails fast when the hub is off or away, or the model is gated
        from .hub import check_hub_model

        check_hub_model(path)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = resolve_dtype(dtype, device)
    cfg = read_config(path)
    check_seq_length(max_seq_length, cfg, where=repr(str(name_or_path)))
    quant = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config") or {}
    prequantized = quant.get("quant_method") == "bitsandbytes"
    if prequantized:
        if not (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
            warnings.warn("this checkpoint is quantized to 8 bits by bitsandbytes; LoRA trains on it through peft's "
                          "layers, not nbtune's fused 4-bit kernels")
        if load_in_4bit is False:
            warnings.warn("this checkpoint is stored pre-quantized by bitsandbytes; it loads quantized as stored")
        load_in_4bit = True
    if load_in_4bit is None:
        load_in_4bit = device.type == "cuda"
    if load_in_4bit and device.type != "cuda" and not prequantized:
        warnings.warn("4-bit loading needs a CUDA GPU; loading the full-precision model on the CPU instead")
        load_in_4bit = False
    if load_in_4bit:
        require_bitsandbytes("4-bit loading (model.load_in_4bit)")
    # use_kernels=False: no Hugging Face hub kernels (transformers 5.25 turns them on whenever the `kernels`
    # package is installed): they would be fetched from the hub and, re-applied on every train()/eval(), take
    # nbtune's patched forwards off the RMSNorm modules (see patches.switch_off_hub_kernels).
    kwargs = dict(dtype=compute_dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                  use_kernels=False, use_safetensors=True)  # never a pickle file (hub ids too; local folders are checked above)
    if load_in_4bit and not prequantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8,
        )
    if device.type == "cuda":
        # "cuda" without an index is the current device: cuda:LOCAL_RANK in a data-parallel run
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    with quiet.loading():  # no "Loading weights" bar between nbtune's lines
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as e:
            if "safetensors" not in str(e) or Path(path).is_dir():
                raise
            raise ModelLoadError(
                f"model.name: {path!r} is not published as safetensors weights; nbtune loads safetensors only, "
                "because loading a pickle file (pytorch_model.bin) can run code hidden in it. Convert it once, in an "
                "environment you trust with it: load it yourself with transformers and save it with "
                "save_pretrained(folder, safe_serialization=True), then give that folder as model.name; or use a "
                "copy of the model that is published as safetensors") from None
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if device.type != "cuda" and not prequantized:
        model.to(device)
    if load_in_4bit:
        set_4bit_compute_dtype(model, compute_dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.max_seq_length = max_seq_length
    model.nbtune_source = name_or_path
    model.nbtune_patch = patch
    return model, tokenizer


def set_4bit_compute_dtype(model, dtype: torch.dtype) -> int:
    """Make every bitsandbytes 4-bit layer compute in ``dtype``; returns how many there are."""
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:  # pragma: no cover - without bitsandbytes there is no 4-bit layer
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.compute_dtype = dtype
    quant_config = getattr(model.config, "quantization_config", None)
    if quant_config is not None and hasattr(quant_config, "bnb_4bit_compute_dtype"):
        quant_config.bnb_4bit_compute_dtype = dtype
    return len(layers)
