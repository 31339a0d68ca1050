"""A merged checkpoint written shard by shard: the adapter folded into the base, never the whole
model in memory.

Each base tensor is read in row blocks (about 16 MB of fp32 at a time, see
:mod:`nbtune.export.checkpoint`), a LoRA pair's rows are added in fp32 (``W + scale * B @ A``, see
:mod:`nbtune.export.adapter`) and rounded once to the output dtype, and the block is appended to
the output shard, whose header was written first. So peak memory is a few row blocks plus one
4-bit tensor dequantized (a pre-quantized base), whatever the size of the model: an 8B model
merges on a free Colab session (12.7 GB RAM) where loading it whole in 16-bit (16 GB) does not.

The folder gets ``config.json`` (the base's, ``quantization_config`` dropped, dtype set),
``generation_config.json``, the tokenizer (the adapter folder's: the one training used, with its
chat template), ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (or one
``model.safetensors``), loadable with ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .adapter import Adapter, ExportError
from .checkpoint import BaseCheckpoint
from .safetensors_io import SafetensorsWriter, nbytes_of

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class MergedTensor:
    """One tensor of the merged model: name, shape, stored dtype, and its row blocks on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the base's dtype (dequantized dtype for a 4-bit weight)
    blocks: Callable[[int], Iterator[torch.Tensor]]  # align -> fp32 (float tensors) row blocks in order

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class MergedModel:
    """The base checkpoint at ``base_dir`` with the adapter at ``adapter_dir`` folded in, as a
    stream of :class:`MergedTensor` (``adapter_dir`` None: the base alone)."""

    def __init__(self, base_dir, adapter_dir=None):
        self.base = BaseCheckpoint(base_dir)
        self.adapter = Adapter(adapter_dir) if adapter_dir is not None else None
        names = self.base.names()
        if self.adapter is not None:
            self.adapter.rename_to(names)
            self.adapter.check_covered(names)
            self.adapter.check_shapes({n: self.base.shape(n) for n in self.adapter.names()})
        self.names = names

    @property
    def config(self) -> dict:
        return self.base.config

    def tensors(self) -> Iterator[MergedTensor]:
        for name in self.names:
            yield MergedTensor(name, self.base.shape(name), self.base.dtype(name),
                               lambda align=1, name=name: self._blocks(name, align))

    def _blocks(self, name: str, align: int) -> Iterator[torch.Tensor]:
        shape = self.base.shape(name)
        replaced = self.adapter.replaced.get(name) if self.adapter else None
        pair = self.adapter.pairs.get(name) if self.adapter else None
        if replaced is not None:
            if tuple(replaced.shape) != shape:
                raise ExportError(f"adapter: the saved {name} has shape {tuple(replaced.shape)}, the base's is {shape}")
            yield replaced.float() if replaced.is_floating_point() else replaced
            return
        if len(shape) == 0:
            t = self.base.rows(name, 0, 1)
            yield t.float() if t.is_floating_point() else t
            return
        step = self.base.row_block(name, align)
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            rows = self.base.rows(name, start, stop)
            if not rows.is_floating_point():
                yield rows
                continue
            rows = rows.float()
            if pair is not None:
                delta = pair.delta_rows(start, stop)
                if delta.shape != rows.shape:
                    raise ExportError(f"adapter: the LoRA update of {name} has shape {tuple(delta.shape)} for rows of "
                                      f"shape {tuple(rows.shape)}; the adapter belongs to another model")
                rows += delta
            yield rows


def parse_size(size) -> int:
    """``"2GB"`` / ``"500MB"`` / an int of bytes -> bytes (decimal units, as transformers reads them)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def export_merged(base_dir, adapter_dir, out_dir, dtype: str = "float16", max_shard_size="2GB",
                  tokenizer_dir=None) -> Path:
    """Write the merged model to ``out_dir`` shard by shard (see the module docstring); returns it.

    ``base_dir``: the base checkpoint folder (16-bit, or pre-quantized bitsandbytes 4-bit);
    ``adapter_dir``: the LoRA adapter (peft format); ``dtype``: float16 / bfloat16 / float32 of the
    merged weights; ``max_shard_size``: largest output shard (bytes or "2GB"); ``tokenizer_dir``:
    where the tokenizer comes from (default: the adapter folder when it holds one, else the base)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype: {dtype!r} is not a merged dtype; use one of {', '.join(DTYPES)}")
    out_dtype = DTYPES[dtype]
    model = MergedModel(base_dir, adapter_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()  # a previous export's shards must not mix with this one's
    limit = parse_size(max_shard_size)

    tensors = list(model.tensors())
    groups: list[list[MergedTensor]] = [[]]
    size = 0
    for t in tensors:
        n = nbytes_of(t.shape, out_dtype if t.is_float else t.dtype)
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    names = ([f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
             if len(groups) > 1 else ["model.safetensors"])
    weight_map, total = {}, 0
    for group, file_name in zip(groups, names):
        writer = SafetensorsWriter(out / file_name)
        for t in group:
            writer.declare(t.name, t.shape, out_dtype if t.is_float else t.dtype)
            weight_map[t.name] = file_name
        total += writer.nbytes
        writer.open()
        try:
            for t in group:
                for block in t.blocks(1):
                    writer.write(t.name, block.to(out_dtype) if block.is_floating_point() else block)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    write_config(model.config, out, dtype)
    copy_side_files(Path(base_dir), out, tokenizer_dir or _tokenizer_source(adapter_dir, base_dir))
    return out


def write_config(config: dict, out: Path, dtype: str) -> None:
    """The base's config.json without quantization_config, with the merged dtype."""
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    for key in ("torch_dtype", "dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = dtype
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _tokenizer_source(adapter_dir, base_dir) -> Path:
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return Path(adapter_dir)
    return Path(base_dir)


def copy_side_files(base_dir: Path, out: Path, tokenizer_dir) -> None:
    """generation_config.json from the base; the tokenizer files from ``tokenizer_dir``."""
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", out / "generation_config.json")
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copyfile(src, out / name)


def say(text: str) -> None:
    print(f"nbtune: {text}", file=sys.stderr)
