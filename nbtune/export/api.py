"""One door to every export of a finished run: ``export_run(RUN_DIR, "gguf", quant="q8_0")``, which
``nbtune export RUN_DIR --format gguf``, ``result.export("gguf")`` and ``output.export: [gguf]``
all call.

A run folder holds ``run.yaml`` (its resolved config: the base model's name) and ``adapter/``.
The base checkpoint is found as training found it: an embedded name is the cached checkpoint, a
folder is itself, a hub id is the hub cache's snapshot (fetched if missing and online). Formats:

- ``adapter``: a copy of the LoRA adapter (peft format, with the tokenizer);
- ``merged``: the adapter folded into a 16-bit checkpoint, shard by shard
  (:func:`nbtune.export.merged.export_merged`), default ``<run>/merged``;
- ``gguf``: one GGUF file + Ollama Modelfile (:func:`nbtune.export.gguf_export.export_gguf`),
  default in ``<run>/gguf``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .adapter import ExportError

FORMATS = ("adapter", "merged", "gguf")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "tokenizer*"]


def base_folder(name: str, trust_remote_code: bool = False) -> Path:
    """The local checkpoint folder of a model name (embedded name, folder, or hub id)."""
    from ..models import resolve_model_path

    source = resolve_model_path(name)
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise ExportError(f"model.name: {name!r} is a hub id and its files are neither in the hub cache nor "
                          f"downloadable now ({type(e).__name__}: {str(e).splitlines()[0][:200]}); export where the "
                          "hub is reachable, or point model.name at a local copy of the checkpoint") from None


def check_gguf_export(cfg, local_folder=None) -> None:
    """Before a run whose output.export has gguf: the architecture is one the GGUF writer knows (when
    the checkpoint is local) and a k-quant has llama.cpp's quantizer, so the run does not train for
    an hour and then fail to export."""
    import json

    from .gguf_export import LLAMA_CPP_QUANTS, check_quant, find_quantizer
    from .gguf_arch import arch_spec

    quant = check_quant(cfg.output.gguf_quant)
    if local_folder is not None:
        arch_spec(json.loads((Path(local_folder) / "config.json").read_text(encoding="utf-8")))
    if quant in LLAMA_CPP_QUANTS:
        find_quantizer()


def read_run(run_dir):
    """(config, adapter folder) of a finished run folder."""
    from ..train.config import build_config

    run_dir = Path(run_dir)
    if not (run_dir / "run.yaml").is_file() or not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise ExportError(f"{str(run_dir)!r} is not a finished nbtune run folder (it needs run.yaml and "
                          "adapter/adapter_config.json; a run writes them to its output.dir)")
    return build_config(run_dir / "run.yaml"), run_dir / "adapter"


def export_run(run_dir, format: str = "gguf", quant: str | None = None, out=None, dtype: str | None = None,
               max_shard_size="2GB") -> Path:
    """Export the run in ``run_dir`` as ``format`` (adapter, merged, gguf); returns what was written.

    ``quant`` (gguf): f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k (default: the run's output.gguf_quant);
    ``out``: where (default ``<run_dir>/<format>``); ``dtype`` (merged): float16 / bfloat16
    (default: the run's output.merged_dtype)."""
    if format not in FORMATS:
        raise ExportError(f"format: {format!r} is not an export format; use one of {', '.join(FORMATS)}")
    cfg, adapter_dir = read_run(run_dir)
    run_dir = Path(run_dir)
    target = Path(out) if out else run_dir / format
    if format == "adapter":
        if target.resolve() != adapter_dir.resolve():
            shutil.copytree(adapter_dir, target, dirs_exist_ok=True)
        return target
    base = base_folder(cfg.model.name, cfg.model.trust_remote_code)
    if format == "merged":
        from .merged import export_merged

        return export_merged(base, adapter_dir, target, dtype=dtype or cfg.output.merged_dtype,
                             max_shard_size=max_shard_size)
    from .gguf_export import export_gguf

    quant = quant or getattr(cfg.output, "gguf_quant", "q8_0")
    name = Path(cfg.model.name).name if Path(cfg.model.name).is_dir() else cfg.model.name.split("/")[-1]
    return export_gguf(base, adapter_dir, target, quant=quant, name=f"{name}-{run_dir.resolve().name}",
                       system_prompt=cfg.data.system_prompt)
