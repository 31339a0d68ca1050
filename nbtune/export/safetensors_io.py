"""Safetensors read one tensor at a time, written one tensor (or one row block) at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{dtype, shape, data_offsets: [begin, end]}`` (offsets into the data that follows), then
the raw little-endian bytes. Reading a tensor is one ``seek`` + ``readinto`` of its byte range into
a fresh buffer, so the process holds that tensor and nothing else of the file (a memory map would
keep every page it touched resident while the file is open: a whole shard). Writing lays out the
header first (every shape and dtype of the shard is known before any value is computed) and then
appends the bytes as they are produced, so an output shard is never assembled in memory.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """The header of one ``.safetensors`` file; :meth:`read` loads one tensor with plain file reads."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict = header
        self.data_start = 8 + n

    def keys(self) -> list[str]:
        """Tensor names in the order their bytes lie in the file (reads then run front to back)."""
        return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name]["dtype"]
        if code not in DTYPES:
            raise ValueError(f"{self.path.name}: tensor {name!r} has dtype {code}, which nbtune's export cannot read")
        return DTYPES[code]

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype and shape, in memory of its own (no file mapping)."""
        begin, end = self.entries[name]["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            view = memoryview(buf)
            got = 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{self.path.name} is truncated: tensor {name!r} ends past the end of the file")
                got += n
        dtype = self.dtype(name)
        if not buf:
            return torch.empty(self.shape(name), dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(self.shape(name))


def nbytes_of(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are declared up front: ``declare(name, shape,
    dtype)`` for each, then ``open()``, then each tensor's values with ``write(name, chunk)`` in
    declaration order (a tensor may come in several row blocks), then ``close()``, which checks
    that every byte promised by the header was written."""

    def __init__(self, path, metadata: dict | None = None):
        self.path = Path(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.declared: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        self._file = None
        self._pending: Iterator | None = None
        self._current = None  # (name, bytes left)

    @property
    def nbytes(self) -> int:
        return sum(nbytes_of(shape, dtype) for _, shape, dtype in self.declared)

    def declare(self, name: str, shape, dtype: torch.dtype) -> None:
        if self._file is not None:
            raise RuntimeError("declare every tensor before open()")
        self.declared.append((name, tuple(int(s) for s in shape), dtype))

    def open(self) -> None:
        header, offset = {}, 0
        for name, shape, dtype in self.declared:
            n = nbytes_of(shape, dtype)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header = {"__metadata__": self.metadata, **header}
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(text)))
        self._file.write(text)
        self._pending = iter([d for d in self.declared if nbytes_of(d[1], d[2])])  # empty tensors: header only
        self._current = None

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append ``chunk`` (row block of, or all of, tensor ``name``) in the declared dtype."""
        if self._current is None or self._current[1] == 0:
            expected, shape, dtype = next(self._pending)
            self._current = [expected, nbytes_of(shape, dtype), dtype]
        expected, left, dtype = self._current
        if name != expected:
            raise RuntimeError(f"{self.path.name}: wrote {name!r} while {expected!r} was due (declaration order)")
        data = chunk.detach().to("cpu", dtype).contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        if len(raw) > left:
            raise RuntimeError(f"{self.path.name}: more bytes for {name!r} than its declared shape holds")
        self._file.write(memoryview(raw) if len(raw) else b"")
        self._current[1] = left - len(raw)

    def close(self) -> None:
        try:
            missing = [n for n, *_ in self._pending] if self._pending is not None else []
            if (self._current and self._current[1]) or missing:
                raise RuntimeError(f"{self.path.name}: not every declared tensor was written "
                                   f"({(self._current or [''])[0] or missing[0]!r} is short)")
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    def abort(self) -> None:
        """Close and delete a file left half-written by an error."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


def model_shards(folder) -> list[Path]:
    """The ``*.safetensors`` weight files of a checkpoint folder, in the index's order when it has one."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in dict.fromkeys(sorted(set(weight_map.values())))]
    shards = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not shards:
        raise FileNotFoundError(f"{str(folder)!r} has no *.safetensors weights (nbtune's export reads safetensors "
                                "only; save the model with save_pretrained(..., safe_serialization=True))")
    return shards
