"""A saved LoRA adapter (peft format) read as "what to add to each base tensor".

For a linear layer with base weight ``W`` (out x in), peft's LoRA computes
``y = x W^T + scale * (x A^T) B^T`` with ``A`` (r x in), ``B`` (out x r), so the merged weight is

    W' = W + scale * (B @ A),     scale = alpha / r      (alpha / sqrt(r) with use_rslora)

(``r`` and ``alpha`` per module where ``rank_pattern`` / ``alpha_pattern`` say so). An embedding
LoRA stores ``lora_embedding_A`` (r x vocab) and ``lora_embedding_B`` (hidden x r); its delta is
``scale * (B @ A)^T`` (vocab x hidden). ``modules_to_save`` replace the base tensor outright.
The fold is computed in fp32 and rounded once to the output dtype. DoRA and fan-in/fan-out
(GPT-2 Conv1D) adapters are refused with a message: their fold is not this formula.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_io import SafetensorsFile

PREFIX = "base_model.model."


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names what is wrong and the fix."""


@dataclass
class LoraPair:
    A: torch.Tensor  # (r, in) fp32; for an embedding (r, vocab)
    B: torch.Tensor  # (out, r) fp32; for an embedding (hidden, r)
    scale: float
    embedding: bool = False

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the fp32 delta added to the base tensor."""
        if self.embedding:  # delta = (B @ A)^T = A^T @ B^T, rows of A^T are columns of A
            return self.scale * (self.A[:, start:stop].T @ self.B.T)
        return self.scale * (self.B[start:stop] @ self.A)


class Adapter:
    """The LoRA pairs and replaced modules of an adapter folder, keyed by base tensor name."""

    def __init__(self, folder):
        self.folder = Path(folder)
        config_path = self.folder / "adapter_config.json"
        weights = self.folder / "adapter_model.safetensors"
        if not config_path.is_file() or not weights.is_file():
            raise ExportError(
                f"adapter: {str(self.folder)!r} is not a saved LoRA adapter (adapter_config.json and "
                "adapter_model.safetensors are needed; a run writes them to <output.dir>/adapter)")
        self.config = json.loads(config_path.read_text(encoding="utf-8"))
        if self.config.get("peft_type", "LORA") != "LORA":
            raise ExportError(f"adapter: {self.config.get('peft_type')} adapters cannot be merged by nbtune's "
                              "export; only LoRA adapters can")
        if self.config.get("use_dora"):
            raise ExportError("adapter: a DoRA adapter (use_dora: true) rescales each weight column by a learned "
                              "magnitude, which this merge does not do; merge it with peft's merge_and_unload")
        if self.config.get("fan_in_fan_out"):
            raise ExportError("adapter: fan_in_fan_out adapters (GPT-2 style Conv1D layers) are not supported by "
                              "nbtune's export")
        self.base_model = self.config.get("base_model_name_or_path")
        file = SafetensorsFile(weights)
        tensors = {name: file.read(name) for name in file.keys()}  # an adapter is small: all of it in memory
        self.pairs: dict[str, LoraPair] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        for name, value in tensors.items():
            module = name.removeprefix(PREFIX)
            for a_key, b_key, emb in ((".lora_A.weight", ".lora_B.weight", False),
                                      (".lora_embedding_A", ".lora_embedding_B", True)):
                if module.endswith(a_key):
                    module = module[: -len(a_key)]
                    b_name = name[: -len(a_key)] + b_key
                    if b_name not in tensors:
                        raise ExportError(f"adapter: {name} has no matching {b_key} tensor; the adapter file is "
                                          "incomplete")
                    A, B = value.float(), tensors[b_name].float()
                    self.pairs[module + ".weight"] = LoraPair(A, B, self._scale(module, A.shape[0]), emb)
                    break
            else:
                if ".lora_B." in name or name.endswith(".lora_embedding_B"):
                    continue
                if ".lora_" in name:
                    raise ExportError(f"adapter: tensor {name} is of a LoRA variant nbtune's export does not know")
                self.replaced[module.replace(".modules_to_save.default", "")] = value

    def _scale(self, module: str, rank: int) -> float:
        alpha = self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(rank)
        return alpha / rank

    def rename_to(self, base_names) -> None:
        """Follow the base checkpoint's spelling of a multimodal model's text tensors: a model built as
        ``model.language_model.*`` (transformers >= 5) from a checkpoint saved as ``language_model.model.*``."""
        base = set(base_names)
        for table in (self.pairs, self.replaced):
            for name in list(table):
                if name not in base and name.startswith("model.language_model."):
                    alias = "language_model.model." + name[len("model.language_model."):]
                    if alias in base:
                        table[alias] = table.pop(name)

    def names(self) -> set[str]:
        return set(self.pairs) | set(self.replaced)

    def check_covered(self, base_names) -> None:
        """Every adapted tensor must exist in the base: else the adapter belongs to another model."""
        missing = sorted(self.names() - set(base_names))
        if missing:
            raise ExportError(
                f"adapter: {len(missing)} adapted tensor(s) are not in the base checkpoint (first: {missing[0]!r}); "
                f"the adapter was trained on another model than the one given as base"
                + (f" (the adapter names {self.base_model!r})" if self.base_model else ""))

    def check_shapes(self, base_shapes: dict) -> None:
        """Each LoRA pair's update and each replaced tensor has its base tensor's shape."""
        for name, shape in base_shapes.items():
            if name in self.pairs:
                p = self.pairs[name]
                got = (p.A.shape[1], p.B.shape[0]) if p.embedding else (p.B.shape[0], p.A.shape[1])
            else:
                got = tuple(self.replaced[name].shape)
            if tuple(got) != tuple(shape):
                raise ExportError(
                    f"adapter: its update of {name} has shape {tuple(got)}, the base tensor's is {tuple(shape)}; "
                    "the adapter was trained on another model than the one given as base"
                    + (f" (the adapter names {self.base_model!r})" if self.base_model else ""))
