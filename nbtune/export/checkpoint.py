"""A base checkpoint's tensors, one at a time and in row blocks, 16-bit or pre-quantized bnb-4bit.

A 16-bit (or fp32) tensor's row block is read straight from its byte range in the shard. A
bitsandbytes 4-bit weight is stored as packed codes (``<name>``, uint8) with its quantization
state beside it (``<name>.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and
``.quant_state.bitsandbytes__nf4`` / ``__fp4``, a JSON blob of shape, dtype and block sizes);
bitsandbytes' ``QuantState.from_dict`` rebuilds the state and the weight is dequantized once per
tensor on the CPU. NF4 goes through :func:`nbtune.kernels.nf4.nf4_dequantize_reference`, which is
bit-identical to bitsandbytes' CUDA kernel and to its ``quantize_4bit`` round trip; bitsandbytes'
own CPU ``dequantize_4bit`` (0.50) is not used for NF4 because on AVX-512 machines it indexes the
scales per row and gets weights whose row length is not a multiple of the block size wrong (see
nbtune/kernels/nf4.py). FP4 (rare) uses bitsandbytes' ``dequantize_4bit``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .adapter import ExportError
from .safetensors_io import SafetensorsFile, model_shards

QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                  ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
CHUNK_BYTES = 16 << 20  # fp32 bytes of one row block: bounds what the export holds at once


class BaseCheckpoint:
    """Headers of every shard of a checkpoint folder; tensors are read on demand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        self.shards = [SafetensorsFile(p) for p in model_shards(self.folder)]
        self.where: dict[str, SafetensorsFile] = {}
        for shard in self.shards:
            for key in shard.keys():
                self.where[key] = shard
        quant = self.config.get("quantization_config") or {}
        self.quant_method = quant.get("quant_method")
        if self.quant_method and self.quant_method != "bitsandbytes":
            raise ExportError(f"base model: weights quantized with {self.quant_method!r} cannot be exported by nbtune; "
                              "give the 16-bit model or a bitsandbytes 4-bit one")
        if self.quant_method and quant.get("load_in_8bit"):
            raise ExportError("base model: bitsandbytes 8-bit weights cannot be exported by nbtune; give the 16-bit "
                              "model or a bitsandbytes 4-bit one")
        self._dense_cache: tuple[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ what is there
    def _quant_blob(self, name: str) -> str | None:
        for kind in ("nf4", "fp4"):
            key = f"{name}.quant_state.bitsandbytes__{kind}"
            if key in self.where:
                return key
        return None

    def is_4bit(self, name: str) -> bool:
        return self._quant_blob(name) is not None

    def names(self) -> list[str]:
        """Logical tensor names (quantization side tensors folded into their weight), shard by shard."""
        out = []
        for shard in self.shards:
            for key in shard.keys():
                if key.endswith(QUANT_SUFFIXES) and any(key.startswith(w) for w in self._owners(key)):
                    continue
                out.append(key)
        return out

    def _owners(self, key: str):
        for suffix in QUANT_SUFFIXES:
            if key.endswith(suffix):
                owner = key[: -len(suffix)]
                if owner in self.where and self.is_4bit(owner):
                    yield owner

    def _state(self, name: str) -> dict:
        blob = self.where[self._quant_blob(name)].read(self._quant_blob(name))
        return json.loads(bytes(blob.numpy().tobytes()).decode("utf-8"))

    def shape(self, name: str) -> tuple[int, ...]:
        if self.is_4bit(name):
            return tuple(self._state(name)["shape"])
        return self.where[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if self.is_4bit(name):
            return getattr(torch, self._state(name)["dtype"])
        return self.where[name].dtype(name)

    # ------------------------------------------------------------------ values
    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of tensor ``name`` in its stored (dequantized) dtype."""
        if self.is_4bit(name):
            return self._dense(name)[start:stop]
        shard = self.where[name]
        shape = shard.shape(name)
        if len(shape) == 0:
            return shard.read(name)
        row_bytes = shard.nbytes(name) // shape[0] if shape[0] else 0
        begin = shard.entries[name]["data_offsets"][0] + start * row_bytes
        n = (stop - start) * row_bytes
        buf = bytearray(n)
        with open(shard.path, "rb") as f:
            f.seek(shard.data_start + begin)
            if f.readinto(buf) != n:
                raise ExportError(f"{shard.path.name} is truncated at tensor {name!r}")
        dtype = shard.dtype(name)
        if n == 0:
            return torch.empty((stop - start, *shape[1:]), dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(stop - start, *shape[1:])

    def _dense(self, name: str) -> torch.Tensor:
        if self._dense_cache is None or self._dense_cache[0] != name:
            self._dense_cache = None  # free the previous tensor before building the next
            self._dense_cache = (name, self._dequantize(name))
        return self._dense_cache[1]

    def _dequantize(self, name: str) -> torch.Tensor:
        try:
            from bitsandbytes.functional import QuantState
        except Exception as e:  # pragma: no cover - bitsandbytes is a dependency
            raise ExportError(f"base model: its weights are bitsandbytes 4-bit and bitsandbytes cannot be imported "
                              f"({type(e).__name__}: {e}); install it: pip install -U bitsandbytes") from None
        parts = {key: self.where[key].read(key) for key in self.where
                 if key.startswith(name + ".") and key.endswith(QUANT_SUFFIXES)}
        state = QuantState.from_dict({k[len(name) + 1:]: v for k, v in parts.items()}, device=torch.device("cpu"))
        packed = self.where[name].read(name)
        if state.quant_type == "nf4":
            from ..kernels.nf4 import nf4_dequantize_reference

            out = torch.empty(state.shape, dtype=state.dtype)
            return nf4_dequantize_reference(packed, state, out=out).reshape(state.shape)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(packed, quant_state=state).reshape(state.shape)

    def row_block(self, name: str, align: int = 1) -> int:
        """Rows per block for tensor ``name``: about CHUNK_BYTES of fp32, a multiple of ``align``."""
        shape = self.shape(name)
        if len(shape) < 2:
            return max(shape[0], 1) if shape else 1
        per_row = math.prod(shape[1:]) * 4
        rows = max(CHUNK_BYTES // max(per_row, 1), 1)
        rows = max(rows // align, 1) * align
        return min(rows, shape[0]) if shape[0] else 1
