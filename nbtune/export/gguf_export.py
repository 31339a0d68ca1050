"""A fine-tune as one GGUF file for llama.cpp, Ollama and LM Studio, written tensor by tensor.

The merged weights come from :class:`nbtune.export.merged.MergedModel` (base + adapter folded in
fp32, row block by row block), are renamed and reshaped for llama.cpp
(:mod:`nbtune.export.gguf_arch`) and encoded as they stream out: every tensor's name, shape and
type is declared in the GGUF header first, then its bytes are appended block by block, so the
whole model is never in memory. The tokenizer and chat template go in as metadata
(:mod:`nbtune.export.gguf_vocab`), and an Ollama ``Modelfile`` is written beside the file
(:mod:`nbtune.export.modelfile`).

Quantization (``quant``):

- ``f16`` / ``bf16``: 16-bit weights; ``q8_0``: 8-bit blocks of 32 with one fp16 scale each
  (``gguf.quants``); all in Python. A weight whose rows are not a multiple of 32 stays f16 in a
  q8_0 file, and 1-D tensors and norms stay f32, as llama.cpp's own converter does;
- ``q4_k_m``, ``q5_k_m``, ``q6_k``: llama.cpp's k-quants, made by llama.cpp itself from a 16-bit
  GGUF: the ``llama-quantize`` program when it is on PATH, else llama-cpp-python's
  ``llama_model_quantize``; without either the export stops and says what to install.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from .adapter import ExportError
from .gguf_arch import arch_spec, gguf_tensor_name, write_hparams
from .merged import MergedModel, _tokenizer_source

PYTHON_QUANTS = ("f16", "bf16", "q8_0")
LLAMA_CPP_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
QUANTS = PYTHON_QUANTS + tuple(LLAMA_CPP_QUANTS)


def _qtype(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[name]


def _file_type(quant: str):
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]


def check_quant(quant: str) -> str:
    quant = str(quant).lower()
    if quant not in QUANTS:
        raise ExportError(f"quant: {quant!r} is not a GGUF quantization nbtune writes; use one of {', '.join(QUANTS)}")
    return quant


def tensor_type(gguf_name: str, shape, quant: str) -> str:
    """The stored type of one tensor in a ``quant`` file (llama.cpp's converter's rules)."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return "f32"
    if quant == "q8_0" and shape[-1] % 32:
        return "f16"
    return quant


def _encode(rows: torch.Tensor, kind: str) -> np.ndarray:
    """fp32 rows -> the bytes of ``kind`` (f32, f16, bf16 round-to-nearest-even, q8_0 blocks)."""
    if kind == "f32":
        return rows.float().contiguous().numpy()
    if kind == "f16":
        return rows.half().contiguous().numpy()
    if kind == "bf16":
        return rows.bfloat16().contiguous().view(torch.int16).numpy()
    import gguf

    return gguf.quants.quantize(rows.float().contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)


def _nbytes(shape, kind: str) -> int:
    import gguf

    if kind == "q8_0":
        return int(np.prod(gguf.quant_shape_to_byte_shape(tuple(shape), _qtype("q8_0"))))
    return int(np.prod(shape)) * (4 if kind == "f32" else 2)


def export_gguf(base_dir, adapter_dir, out, quant: str = "q8_0", tokenizer_dir=None, name: str | None = None,
                modelfile: bool = True, system_prompt: str | None = None) -> Path:
    """Write ``base_dir`` + the adapter at ``adapter_dir`` (None: the base alone) as a GGUF file.

    ``out``: a ``.gguf`` path, or a folder (the file is then ``<name>-<quant>.gguf`` in it);
    ``quant``: one of f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k; ``tokenizer_dir``: where the tokenizer
    comes from (default: the adapter folder when it has one, else the base); ``modelfile``: also
    write an Ollama ``Modelfile`` beside it (``system_prompt`` as its SYSTEM). Returns the path."""
    quant = check_quant(quant)
    out = Path(out)
    name = name or (Path(adapter_dir).parent.name if adapter_dir else Path(base_dir).name) or "model"
    path = out if out.suffix == ".gguf" else out / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}-{quant}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else _tokenizer_source(adapter_dir, base_dir)
    if quant in LLAMA_CPP_QUANTS:
        quantizer = find_quantizer()  # before the long part: say what to install first
        model = MergedModel(base_dir, adapter_dir)
        inter = "bf16" if str(model.config.get("torch_dtype", model.config.get("dtype"))) == "bfloat16" else "f16"
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".nbtune-gguf-") as tmp:
            source = Path(tmp) / f"model-{inter}.gguf"
            info = _write(model, source, inter, tok_dir, name)
            quantizer(source, path, LLAMA_CPP_QUANTS[quant])
    else:
        info = _write(MergedModel(base_dir, adapter_dir), path, quant, tok_dir, name)
    if modelfile:
        from .modelfile import write_modelfile

        write_modelfile(path, info["tokenizer"], eot=info["eot"], system_prompt=system_prompt)
    return path


def _write(model: MergedModel, path: Path, quant: str, tokenizer_dir: Path, name: str) -> dict:
    import gguf

    spec = arch_spec(model.config)
    tensor_map = gguf.get_tensor_name_map(spec.gguf_arch, spec.hparams["num_hidden_layers"])
    plan = []  # (gguf name, MergedTensor or Extra, shape, kind)
    for extra in spec.extras:
        plan.append((extra.gguf_name, extra, tuple(extra.value.shape), "f32"))
    n_vocab = None
    for t in model.tensors():
        gname = gguf_tensor_name(spec, t.name, tensor_map)
        if gname is None:
            continue
        if gname == "token_embd.weight":
            n_vocab = t.shape[0]
        plan.append((gname, t, t.shape, tensor_type(gname, t.shape, quant)))
    if n_vocab is None:
        raise ExportError("GGUF export: the checkpoint has no token embedding (model.embed_tokens.weight)")

    writer = gguf.GGUFWriter(str(path), spec.arch_name)
    try:
        writer.add_name(name)
        writer.add_file_type(_file_type(quant))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, spec)
        info = _vocab(writer, tokenizer_dir, n_vocab)
        for gname, _, shape, kind in plan:
            writer.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, kind), raw_dtype=_qtype(kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for gname, source, shape, kind in plan:
            writer.tensors[0].pop(gname)
            writer.write_padding(fout, fout.tell())
            written = 0
            if hasattr(source, "blocks"):
                align = spec.row_align(source.name)
                start = 0
                for rows in source.blocks(align):
                    if spec.transform is not None:
                        rows = spec.transform(source.name, rows, start)
                    data = _encode(rows, kind)
                    fout.write(data.tobytes())
                    written += data.nbytes
                    start += rows.shape[0] if rows.dim() else 1
            else:
                data = _encode(source.value, kind)
                fout.write(data.tobytes())
                written = data.nbytes
            if written != _nbytes(shape, kind):
                raise ExportError(f"GGUF export: {gname} wrote {written} bytes, its header says {_nbytes(shape, kind)}")
            writer.write_padding(fout, written)
        writer.state = type(writer.state).WEIGHTS
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    writer.close()
    return info


def _vocab(writer, tokenizer_dir: Path, n_vocab: int) -> dict:
    from .gguf_vocab import write_vocab

    return write_vocab(writer, tokenizer_dir, n_vocab)


# ---------------------------------------------------------------------------- k-quants through llama.cpp
INSTALL_HINT = ("k-quants (q4_k_m, q5_k_m, q6_k) are made by llama.cpp's own quantizer: put llama.cpp's "
                "llama-quantize program on PATH (build llama.cpp, or install a release), or `pip install "
                "llama-cpp-python`; f16, bf16 and q8_0 need neither")


def find_quantizer():
    """A callable (src, dst, "Q4_K_M") that runs llama.cpp's quantizer, or an ExportError saying what to install."""
    exe = os.environ.get("NBTUNE_LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    if exe:
        def run(src: Path, dst: Path, kind: str) -> None:
            proc = subprocess.run([exe, str(src), str(dst), kind], capture_output=True, text=True)
            if proc.returncode != 0:
                raise ExportError(f"GGUF export: {exe} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        return run
    try:
        import llama_cpp
    except Exception:
        raise ExportError(f"GGUF export: {INSTALL_HINT}") from None

    def run(src: Path, dst: Path, kind: str) -> None:
        import ctypes

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise ExportError(f"GGUF export: llama.cpp's llama_model_quantize returned {rc} for {kind}")
    return run
