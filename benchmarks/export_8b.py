"""An 8B export at full size: host RAM under free Colab's cap, and the GGUF against the merged model.

    python benchmarks/export_8b.py --work DIR [--assets .bench-assets] [--cap-gb 12.7] [--quant q8_0]

On a llama3-8b-shaped checkpoint with random weights (SmolLM2's tokenizer and vocabulary, as in
benchmarks/trainer.py) and a random LoRA adapter (r 16 on the seven projections, B non-zero so the
merge changes every adapted weight), it runs what a user runs after training:

1. the GGUF export (``nbtune.export.gguf_export.export_gguf``, ``--quant``) from the 16-bit base,
2. the merged safetensors export (``export_merged``, float16) from the 16-bit base,
3. the same merged export from the base saved pre-quantized in bitsandbytes NF4 (the checkpoint a
   Colab user most often starts from),

each in its own process under a host-RAM cap (benchmarks/host_cap.py: a memory cgroup, so going over
is an OOM kill), with its peak RSS, time and output size. Then it checks the GGUF in a real llama.cpp
(llama-cpp-python): it loads, and its logits on 16 tokens of a GSM8K question agree with those of
base + adapter merged by peft (transformers; ``--reference-dtypes``, bf16 by default, float32 where
the machine holds it): cosine similarity and relative error per position, argmax and top-5
agreement. The base and the NF4 copy stay in DIR for later runs; the exports are removed after
they are measured (they are large). Results: one JSON document (``--json``, default
benchmarks/results/export-8b-<stamp>.json), which RESULTS.md's export section is generated from.

Disk: about 15 GB (base) + 5.5 GB (NF4) + 15 GB (merged) + 8 GB (q8_0) at the most. RAM outside
the cap: building the base and the reference logits load the 16-bit model whole (about 15 GB).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
from host_cap import run_capped  # noqa: E402
from trainer_data import build_checkpoint, gsm8k_rows, resolve_assets  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_TOKENS = 16


def folder_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def build_adapter(base: str, out: str, r: int = 16, scale: float = 0.02, seed: int = 1) -> str:
    """A peft LoRA adapter of ``base`` (r ``r`` on the seven projections) with random A and B,
    made on the meta device: only the adapter's own tensors are ever allocated."""
    if os.path.isfile(os.path.join(out, "adapter_model.safetensors")):
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in sorted(peft_model.named_parameters()):
        if "lora_" not in name:
            continue
        key = name.replace(".default.weight", ".weight")
        if "lora_A" in name:  # peft's init: kaiming-uniform rows of fan-in in_features
            bound = 1.0 / p.shape[1] ** 0.5
            tensors[key] = (torch.rand(p.shape, generator=g) * 2 - 1) * bound
        else:
            tensors[key] = torch.randn(p.shape, generator=g) * scale
    os.makedirs(out, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              os.path.join(out, "adapter_model.safetensors"))
    peft_model.peft_config["default"].save_pretrained(out)
    return out


def build_nf4(base: str, out: str) -> str:
    """``base`` saved pre-quantized by transformers + bitsandbytes (NF4, double quantization), on the CPU."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map="cpu",
                                                 dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size="2GB")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


EXPORT_SCRIPT = """
import sys
from nbtune.export.gguf_export import export_gguf
from nbtune.export.merged import export_merged
kind, base, adapter, out, arg = sys.argv[1:6]
if kind == "gguf":
    export_gguf(base, adapter, out, quant=arg, modelfile=True)
else:
    export_merged(base, adapter, out, dtype=arg, max_shard_size="2GB")
"""


def capped_export(kind: str, base: str, adapter: str, out: str, arg: str, cap_gb: float, log) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    result = run_capped([sys.executable, "-c", EXPORT_SCRIPT, kind, base, adapter, out, arg], cap_gb, env=env, log=log)
    result.pop("cmd", None)
    result["output_bytes"] = folder_bytes(out) if os.path.exists(out) else 0
    return result


def prompt_ids(tokenizer, rows_path: str) -> list[int]:
    question = gsm8k_rows(rows_path)[0]["question"]
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return (bos + ids)[:N_TOKENS]


def reference_logits(base: str, adapter: str, ids: list[int], dtype: str = "bfloat16", device: str = "cpu"):
    """The logits of base + adapter merged by peft (not nbtune's merge: an independent reference),
    in ``dtype`` on ``device``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), device_map={"": device})
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return logits


def llama_cpp_logits(gguf_path: str, ids: list[int]):
    import numpy as np
    from llama_cpp import Llama

    t0 = time.monotonic()
    llm = Llama(model_path=gguf_path, n_ctx=64, logits_all=True, n_threads=os.cpu_count(), verbose=False)
    load_s = time.monotonic() - t0
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
    del llm
    return logits, load_s


def agreement(ref, got) -> dict:
    import numpy as np

    ref, got = ref.astype(np.float64), got.astype(np.float64)
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    top5 = [len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(ref, got)]
    return {"positions": int(ref.shape[0]), "cosine_min": round(float(cos.min()), 6),
            "cosine_mean": round(float(cos.mean()), 6), "rel_error_max": round(float(rel.max()), 5),
            "rel_error_mean": round(float(rel.mean()), 5),
            "argmax_agree": round(float((ref.argmax(-1) == got.argmax(-1)).mean()), 4),
            "top5_overlap": round(float(np.mean(top5)), 4),
            "logit_std": round(float(ref.std()), 4)}


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        out["gpu"] = None
    for key, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                      ("bitsandbytes", "bitsandbytes"), ("gguf", "gguf"), ("llama_cpp", "llama_cpp_python"),
                      ("nbtune", "nbtune")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for the base, the NF4 copy and the exports")
    ap.add_argument("--assets", default=None, help="folder made by `trainer_data.py export` (else nbtune's copies)")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quick check of this script)")
    ap.add_argument("--cap-gb", type=float, default=12.7)
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--device", default="cpu", help="where the random base is made (cpu or cuda)")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: gguf, merged, nf4")
    ap.add_argument("--reference-dtypes", default="bfloat16",
                    help="comma-separated dtypes of the reference logits (the first is the headline), e.g. "
                         "float32,bfloat16 where the machine holds the 8B model in fp32")
    ap.add_argument("--reference-device", default="cpu", help="where the reference runs (cpu or cuda)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = args.json or os.path.join(HERE, "results", f"export-8b-{stamp}.json")
    os.makedirs(args.work, exist_ok=True)
    log = open(os.path.join(args.work, "export.log"), "a")
    tok_dir, rows = resolve_assets(args.assets)
    doc = {"stamp": stamp, "shape": args.shape, "quant": args.quant, "cap_gb": args.cap_gb, "versions": versions(),
           "steps": {}}

    def save():
        os.makedirs(os.path.dirname(out_json), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(doc, f, indent=1)

    base = os.path.join(args.work, f"{args.shape}{f'-{args.layers}l' if args.layers else ''}-bf16")
    t0 = time.monotonic()
    build_checkpoint(base, tok_dir, args.shape, args.device, layers=args.layers)
    adapter = build_adapter(base, os.path.join(args.work, "adapter"))
    from nbtune.export.checkpoint import BaseCheckpoint

    ck = BaseCheckpoint(base)
    cfg = ck.config
    n_params = sum(math.prod(s.shape(k)) for s in ck.shards for k in s.keys())
    doc["model"] = {"params": n_params, "hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
                    "vocab": cfg["vocab_size"], "base_bytes": folder_bytes(base), "lora_r": 16,
                    "prepared_s": round(time.monotonic() - t0, 1)}
    save()
    print(json.dumps({"model": doc["model"]}), flush=True)

    from transformers import AutoTokenizer

    ids = prompt_ids(AutoTokenizer.from_pretrained(base), rows)
    gguf_path = os.path.join(args.work, f"model-{args.quant}.gguf")
    merged = os.path.join(args.work, "merged-from-bf16")
    if "gguf" not in skip:
        doc["steps"]["gguf"] = capped_export("gguf", base, adapter, gguf_path, args.quant, args.cap_gb, log)
        save()
        print(json.dumps({"gguf": doc["steps"]["gguf"]}), flush=True)
    if "merged" not in skip:
        doc["steps"]["merged_from_bf16"] = capped_export("merged", base, adapter, merged, "float16", args.cap_gb, log)
        save()
        print(json.dumps({"merged_from_bf16": doc["steps"]["merged_from_bf16"]}), flush=True)
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        doc["llama_cpp"] = {"loads": None, "missing": "llama-cpp-python is not installed: pip install "
                                                     "llama-cpp-python (or bash .ci/llama_cpp VENV)"}
        print(f"# {doc['llama_cpp']['missing']}; the GGUF is not checked in llama.cpp", flush=True)
    elif os.path.isfile(gguf_path):
        got, load_s = llama_cpp_logits(gguf_path, ids)
        dtypes = [d for d in args.reference_dtypes.split(",") if d]
        by_dtype = {d: agreement(reference_logits(base, adapter, ids, d, args.reference_device), got) for d in dtypes}
        doc["llama_cpp"] = {"loads": True, "load_s": round(load_s, 1), "tokens": len(ids), "reference": dtypes[0],
                            **by_dtype[dtypes[0]], "by_reference": by_dtype}
        save()
        print(json.dumps({"llama_cpp": doc["llama_cpp"]}), flush=True)
    for path in (merged, gguf_path, gguf_path[:-len(".gguf")] + ".Modelfile"):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)
    if "nf4" not in skip:
        t1 = time.monotonic()
        nf4 = build_nf4(base, base[:-len("-bf16")] + "-nf4")
        doc["model"]["nf4_bytes"], doc["model"]["nf4_prepared_s"] = folder_bytes(nf4), round(time.monotonic() - t1, 1)
        merged_nf4 = os.path.join(args.work, "merged-from-nf4")
        doc["steps"]["merged_from_nf4"] = capped_export("merged", nf4, adapter, merged_nf4, "float16", args.cap_gb, log)
        shutil.rmtree(merged_nf4, ignore_errors=True)
        save()
        print(json.dumps({"merged_from_nf4": doc["steps"]["merged_from_nf4"]}), flush=True)
    print(f"# results: {out_json}")
    return 0 if all(s.get("under_cap") for s in doc["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
