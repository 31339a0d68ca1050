"""Export a fine-tune where people run models: a merged safetensors checkpoint written shard by
shard (:mod:`nbtune.export.merged`), GGUF for llama.cpp / Ollama / LM Studio, and the Hub.

It sits beside :mod:`nbtune.train` (it reads saved folders: the base checkpoint and the adapter)
and imports only :mod:`nbtune.kernels` and :mod:`nbtune.models` below it.
"""
from __future__ import annotations

from .adapter import ExportError
from .merged import export_merged

__all__ = ["ExportError", "export_merged"]
