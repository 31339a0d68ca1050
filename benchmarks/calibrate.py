"""Calibrate the planner against nbtune's real peak memory on a GPU, and fit its coefficients.

    python benchmarks/calibrate.py measure --out calibration.json   # on a CUDA GPU (H200: ~5-6 min)
    python benchmarks/calibrate.py fit [calibration.json]           # anywhere: fit + write coefficients
    python benchmarks/calibrate.py check [calibration.json]         # anywhere: predicted vs measured
    python benchmarks/calibrate.py grid                             # list the configurations

On the GPU machine: ``bash benchmarks/gpu_suite.sh calibrate`` (writes $OUT/calibration.json; copy
it over nbtune/planner/calibration.json, then ``fit``). The default file of every command is the
packaged nbtune/planner/calibration.json. ``fit`` and ``check`` are the planner's
(:mod:`nbtune.planner.calibration`, pure Python); this script is the measuring harness, which
imports torch, nbtune.models and nbtune.kernels.

``measure`` follows the protocol of benchmarks/README.md: for each model shape it builds a random-weight
checkpoint of the real dimensions (``from_config`` on the GPU, ``save_pretrained``, a tiny word-level
tokenizer next to it), reloads it through ``nbtune.load_model`` (4-bit NF4 double-quant, or
16-bit), then for every configuration of that shape: ``nbtune.add_lora`` (all linear layers,
alpha = r, with the configuration's checkpointing mode), AdamW 8-bit from bitsandbytes (or torch
AdamW), and 3 training steps on random tokens under autocast (as the HF trainer runs them), SDPA
limited to the memory-efficient backend (what a T4 runs). Batches of more than one sequence get
their last sequence's final eighth padded (attention_mask 0, labels -100), as padded SFT batches
have, so transformers builds its attention mask as in real training. Recorded per configuration:
``torch.cuda.max_memory_reserved()`` over the 3 steps (after ``empty_cache()`` and a peak reset,
the base model already loaded), the allocated peak, the memory after loading, the step time,
which loss path ran (a forward hook on the LM head sees full logits only on the unfused path),
whether layer inputs were offloaded, whether nbtune's architecture patches were active, and
whether the LoRA MLP ran as its layer's checkpointed tail (``mlp_tail``: forward hooks on the
MLPs see the autograd node of their output). The base model is loaded once per (shape, dtype,
4-bit) group and the LoRA adapter is removed again (``unload()``) between configurations.

Results go to the JSON file after every configuration (a run cut short keeps what it measured),
with the date, the GPU, the library versions and the CUDA allocator setting the run had
(``alloc_conf``: "default" or the PYTORCH_ALLOC_CONF value; ``import nbtune`` asks for expandable
segments; files from before recorded null for torch's default). A time budget (``--budget-s``)
skips what would not finish in time.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nbtune.planner import memory
from nbtune.planner.calibration import DEFAULT_FILE, GridPoint, check, fit, format_rows, measured_records, predict
from nbtune.planner.memory import GiB
from nbtune.planner.plan import plan
from nbtune.planner.shapes import CATALOG as SHAPES
from nbtune.planner.shapes import ModelShape

STEPS = 3


def _g(shape, dtype, four_bit, *points):
    return [GridPoint(shape, b, s, dtype, r, four_bit, gc, opt) for b, s, r, gc, opt in points]


# Ordered so the cheap shapes run first (they also warm up CUDA and bitsandbytes); the 8B fp16 group
# (the T4 question) comes before the other 7B shapes. 20 configurations, ~5-6 min on one H200.
GRID: list[GridPoint] = (
    _g("smollm2-135m", "float16", False, (4, 512, 8, "offload", "adamw_8bit"), (2, 2048, 16, "off", "adamw_8bit"))
    + _g("llama-3.2-1b", "float16", True, (4, 2048, 16, "offload", "adamw_8bit"), (1, 8192, 64, "plain", "adamw_8bit"),
         (2, 1024, 8, "off", "adamw_8bit"))
    + _g("llama-3.2-1b", "bfloat16", False, (2, 2048, 16, "offload", "adamw_8bit"), (1, 4096, 32, "plain", "adamw_8bit"))
    + _g("llama-3.1-8b", "float16", True, (1, 2048, 16, "offload", "adamw_8bit"), (1, 8192, 16, "offload", "adamw_8bit"),
         (2, 4096, 64, "offload", "adamw_8bit"), (4, 2048, 8, "offload", "adamw_8bit"),
         (1, 4096, 16, "plain", "adamw_8bit"), (1, 4096, 16, "off", "adamw_8bit"),
         (1, 16384, 16, "offload", "adamw_8bit"))
    + _g("llama-2-7b", "float16", True, (1, 2048, 16, "offload", "adamw_8bit"), (2, 2048, 64, "offload", "adamw_8bit"),
         (4, 1024, 16, "plain", "adamw_8bit"))
    + _g("qwen2.5-7b", "bfloat16", True, (1, 4096, 16, "offload", "adamw_8bit"), (2, 2048, 32, "offload", "adamw_8bit"),
         (1, 2048, 16, "offload", "adamw"))
)


# ============================================================================ measurement side (needs a GPU)
def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "triton", "accelerate", "nbtune"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:
        pass
    return out


def _write_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(path))


def build_checkpoint(shape: ModelShape, path: Path, max_positions: int, device: str = "cuda") -> float:
    """A random-weight bf16 checkpoint of ``shape`` at ``path``; returns seconds taken."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.perf_counter()
    kw = shape.to_hf_config()
    kw["max_position_embeddings"] = max(kw["max_position_embeddings"], max_positions)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(path), max_shard_size="4GB")
    _write_tokenizer(path)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def _checkpoint_root(explicit: str | None, need_bytes: float) -> Path:
    if explicit:
        return Path(explicit)
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes + 24 * GiB:
            return shm / "nbtune-calibration"
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "nbtune-calibration"


def _strip_lora(peft_model):
    """The base model back from a PeftModel, LoRA layers removed, checkpointing and hooks off."""
    try:
        from nbtune.models.patches import unpatch_model

        unpatch_model(peft_model)
    except ImportError:
        pass
    base = peft_model.unload()
    if hasattr(base, "peft_config"):
        try:
            del base.peft_config
        except AttributeError:
            pass
    try:
        base.gradient_checkpointing_disable()
    except Exception:
        pass
    try:
        base.disable_input_require_grads()
    except Exception:
        pass
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _on_cuda(device: str, name: str, *args):
    """torch.cuda.<name>(*args) on a CUDA run; nothing (0) on the CPU smoke run."""
    import torch

    return getattr(torch.cuda, name)(*args) if device == "cuda" else 0


def run_point(base, point: GridPoint, vocab_size: int, steps: int = STEPS, device: str = "cuda") -> tuple[dict, object]:
    """``steps`` training steps of ``point`` on the loaded ``base``; (record fields, base model back).
    ``device="cpu"`` is a smoke run of the same code (memory figures are then 0)."""
    import torch

    from nbtune.kernels.offload import offload_stats, release_pinned_memory, reset_offload_stats
    from nbtune.models import add_lora

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[point.dtype]
    gc.collect()
    _on_cuda(device, "empty_cache")
    model = add_lora(base, r=point.lora_rank, alpha=point.lora_rank, targets="all-linear",
                     gradient_checkpointing=point.gradient_checkpointing)
    try:
        from nbtune.models.patches import is_patched

        patched = bool(is_patched(model))
    except ImportError:  # a checkout from before the patches
        patched = False
    params = [p for p in model.parameters() if p.requires_grad]
    if point.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4)
    head_calls = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: head_calls.append(tuple(o.shape)))
    mlp_nodes, mlp_hooks = _watch_mlp_outputs(model)
    reset_offload_stats()
    gc.collect()
    _on_cuda(device, "empty_cache")
    _on_cuda(device, "reset_peak_memory_stats")
    gen = torch.Generator(device=device).manual_seed(0)
    B, S = point.batch_size, point.seq_len
    times, losses, error = [], [], None
    try:
        for _ in range(steps):
            ids = torch.randint(4, vocab_size, (B, S), device=device, generator=gen)
            mask = torch.ones_like(ids)
            labels = ids.clone()
            if B > 1:
                pad = max(1, S // 8)
                mask[-1, -pad:] = 0
                labels[-1, -pad:] = -100
            _on_cuda(device, "synchronize")
            t = time.perf_counter()
            with torch.autocast(device, dtype=dtype):
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            loss = out.loss
            del out  # the trainer keeps only the loss: the logits go before backward
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _on_cuda(device, "synchronize")
            times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
            del loss
    except torch.OutOfMemoryError as e:
        error = f"OOM: {str(e).splitlines()[0][:200]}"
    except RuntimeError as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    peak_reserved = _on_cuda(device, "max_memory_reserved") / GiB
    peak_alloc = _on_cuda(device, "max_memory_allocated") / GiB
    stats = offload_stats()
    hook.remove()
    for handle in mlp_hooks:
        handle.remove()
    full_logits = any(len(s) >= 2 and s[-1] == head.weight.shape[0] and math.prod(s[:-1]) >= B * S - B
                      for s in head_calls)
    del opt, params
    base = _strip_lora(model)
    del model
    release_pinned_memory()
    gc.collect()
    _on_cuda(device, "empty_cache")
    measured = error is None and device == "cuda"  # a CPU smoke run measures nothing
    tail_node = _tail_node_name()
    record = dict(
        measured_reserved_gib=round(peak_reserved, 4) if measured else None,
        measured_allocated_gib=round(peak_alloc, 4) if measured else None,
        peak_reserved_at_error_gib=round(peak_reserved, 4) if error else None,
        step_s=round(sorted(times)[len(times) // 2], 4) if times else None,
        tokens_per_s=round(B * S / sorted(times)[len(times) // 2]) if times else None,
        first_loss=round(losses[0], 4) if losses else None,
        loss_path="unfused" if full_logits else "fused",  # fused: the head's module is never called
        offloaded_inputs=stats.get("offloaded", 0), patched=patched, attention="efficient", error=error,
        device=device, mlp_tail=tail_node is not None and mlp_nodes.get(tail_node, 0) > 0,
        mlp_output_nodes={str(k): v for k, v in mlp_nodes.items()},  # autograd node of each MLP call's output
    )
    return record, base


def _tail_node_name() -> str | None:
    """The autograd node name of the checkpointed-tail LoRA MLP's output (torch names a custom
    Function's node ``<class name>Backward``); None with a kernels package that has no such MLP."""
    try:
        from nbtune.kernels.lora import _LoRAMLPCheckpointed
    except ImportError:
        return None
    return _LoRAMLPCheckpointed.__name__ + "Backward"


def _watch_mlp_outputs(model):
    """Forward hooks on every decoder MLP (``*MLP`` modules) counting the autograd node types of
    their outputs: (counts by node name, hook handles)."""
    counts: dict = {}

    def note(module, args, output):
        fn = getattr(output, "grad_fn", None)
        name = type(fn).__name__ if fn is not None else None
        counts[name] = counts.get(name, 0) + 1

    handles = [m.register_forward_hook(note) for m in model.modules() if type(m).__name__.endswith("MLP")]
    return counts, handles


def measure(out: str | Path, budget_s: float = 360.0, only: str | None = None, ckpt_root: str | None = None,
            steps: int = STEPS, device: str = "cuda", grid: list[GridPoint] | None = None,
            shapes: dict | None = None) -> dict:
    """Run the grid on the current GPU; write the JSON to ``out`` after every configuration.
    ``device="cpu"`` (with a small ``grid``/``shapes``) is a smoke run of the same code path: it
    checks the machinery, its memory figures are 0 and it must not be committed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("calibration measure needs a CUDA GPU")
    shapes = shapes or SHAPES
    from nbtune.models import load_model

    if device == "cuda":
        # What a T4 runs (the T4 emulation of benchmarks/README.md): SDPA's memory-efficient backend only.
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
        try:
            torch.backends.cuda.enable_cudnn_sdp(False)
        except AttributeError:
            pass
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        gpu_name = torch.cuda.get_device_properties(0).name
    else:
        free = total = 0
        gpu_name = "cpu (smoke run: no memory figures)"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = dict(
        schema=1, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=gpu_name, gpu_total_gib=round(total / GiB, 3),
        context_gib=round((total - free - _on_cuda(device, "memory_reserved")) / GiB, 3), versions=_versions(),
        alloc_conf=memory.allocator_setting(),  # the reserved-minus-allocated gap depends on it
        protocol=("random-weight checkpoints of real shapes reloaded with nbtune.load_model; nbtune.add_lora (all "
                  f"linear, alpha=r); {steps} steps on random tokens under autocast; SDPA memory-efficient only; "
                  "peak = torch.cuda.max_memory_reserved() after empty_cache + reset, base model loaded"),
        records=[],
    )
    try:  # the host-RAM constants are measured apart (calibration.json "host"): kept as they are
        data["host"] = json.loads(out.read_text(encoding="utf-8"))["host"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    grid = [p for p in (grid or GRID) if not only or any(o in p.label() for o in only.split(","))]
    groups: dict = {}
    for p in grid:
        groups.setdefault(p.group, []).append(p)

    def save():
        out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    print(f"# nbtune planner calibration on {gpu_name}: {len(grid)} configurations in {len(groups)} groups, "
          f"budget {budget_s:.0f} s", flush=True)
    print(f"{'configuration':<58}{'measured':>9}{'predicted':>10}{'error':>8}  {'loss':<8}{'tok/s':>7}", flush=True)
    built: dict[str, Path] = {}
    last_group_of = {key[0]: n for n, key in enumerate(groups)}
    for n_group, ((shape_name, dtype, four_bit), points) in enumerate(groups.items()):
        shape = shapes[shape_name]
        elapsed = time.perf_counter() - t_start
        if elapsed > budget_s:
            for p in points:
                data["records"].append(_skipped(p, shape, "time budget"))
            print(f"# skipped {shape_name} {dtype} (time budget)", flush=True)
            save()
            continue
        root = _checkpoint_root(ckpt_root, shape.total_params * 2)
        path = root / shape_name
        group_info = {}
        try:
            if shape_name not in built:
                if path.exists():
                    shutil.rmtree(path)
                path.mkdir(parents=True, exist_ok=True)
                group_info["build_s"] = round(build_checkpoint(shape, path, max(p.seq_len for p in points), device), 1)
                built[shape_name] = path
            t = time.perf_counter()
            _on_cuda(device, "reset_peak_memory_stats")
            base, _tok = load_model(str(path), max_seq_length=max(p.seq_len for p in points), load_in_4bit=four_bit,
                                    dtype=dtype, device=device)
            base.config.use_cache = False
            _on_cuda(device, "synchronize")
            group_info.update(load_s=round(time.perf_counter() - t, 1),
                              load_peak_reserved_gib=round(_on_cuda(device, "max_memory_reserved") / GiB, 4),
                              after_load_allocated_gib=round(_on_cuda(device, "memory_allocated") / GiB, 4))
            gc.collect()
            _on_cuda(device, "empty_cache")
            group_info["after_load_reserved_gib"] = round(_on_cuda(device, "memory_reserved") / GiB, 4)
        except Exception as e:  # a shape that cannot be built or loaded: record it, go on with the next
            why = f"build/load failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"# {shape_name} {dtype}: {why}", flush=True)
            data["records"] += [dict(_skipped(p, shape, "load"), error=why) for p in points]
            save()
            base = None
        for k, p in enumerate(points if base is not None else []):
            if time.perf_counter() - t_start > budget_s:
                data["records"].append(_skipped(p, shape, "time budget"))
                print(f"# skipped {p.label()} (time budget)", flush=True)
                save()
                continue
            try:
                fields, base = run_point(base, p, shape.vocab_size, steps, device)
            except Exception as e:  # the adapter could not be set up or removed: the base is in doubt
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                print(f"{p.label():<58}  failed: {why}; skipping the rest of this group", flush=True)
                data["records"] += [dict(_skipped(q, shape, "group failed"), error=why) for q in points[k:]]
                save()
                base = None
                break
            rec = dict(label=p.label(), **dataclasses.asdict(p), shape_dims=dataclasses.asdict(shape), **group_info,
                       **fields)
            data["records"].append(rec)
            save()
            if rec["measured_reserved_gib"] is not None and device == "cuda":
                pr = predict(rec, memory.DEFAULT_COEFFICIENTS).reserved_gib
                m = rec["measured_reserved_gib"]
                print(f"{p.label():<58}{m:9.2f}{pr:10.2f}{100 * (pr - m) / m:+7.1f}%  {rec['loss_path'] or '?':<8}"
                      f"{rec['tokens_per_s'] or 0:>7}", flush=True)
            else:
                print(f"{p.label():<58}  {rec['error'] or 'ran (smoke run, no memory figures)'}", flush=True)
        base = _tok = None
        gc.collect()
        _on_cuda(device, "empty_cache")
        if last_group_of[shape_name] == n_group:
            shutil.rmtree(path, ignore_errors=True)
    data["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    save()
    n = len(measured_records(data))
    print(f"# {n}/{len(grid)} measured in {data['elapsed_s']:.0f} s -> {out}", flush=True)
    return data


def _skipped(p: GridPoint, shape: ModelShape, why: str) -> dict:
    return dict(label=p.label(), **dataclasses.asdict(p), shape_dims=dataclasses.asdict(shape),
                measured_reserved_gib=None, error=f"skipped ({why})")


# ============================================================================ command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/calibrate.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="measure the grid on this GPU (needs CUDA, bitsandbytes)")
    m.add_argument("--out", default=str(DEFAULT_FILE), help="JSON to write (default: the packaged calibration.json)")
    m.add_argument("--budget-s", type=float, default=360.0, help="skip configurations that start after this many s")
    m.add_argument("--only", default=None, help="comma-separated substrings of configuration labels to run")
    m.add_argument("--ckpt-root", default=None, help="where to build the random checkpoints (default /dev/shm or tmp)")
    m.add_argument("--steps", type=int, default=STEPS)
    f = sub.add_parser("fit", help="fit the coefficients to a measured JSON and store them in it")
    f.add_argument("path", nargs="?", default=str(DEFAULT_FILE))
    c = sub.add_parser("check", help="predicted vs measured for every record; exit 1 if any is off")
    c.add_argument("path", nargs="?", default=str(DEFAULT_FILE))
    c.add_argument("--defaults", action="store_true", help="use the default (unfitted) coefficients")
    sub.add_parser("grid", help="list the configurations")
    args = ap.parse_args(argv)
    if args.cmd == "measure":
        measure(args.out, args.budget_s, args.only, args.ckpt_root, args.steps)
        rows = check(args.out, memory.DEFAULT_COEFFICIENTS)
        if rows:
            print("\n# against the default (unfitted) coefficients:\n" + format_rows(rows))
        return 0
    if args.cmd == "fit":
        before = check(args.path, memory.DEFAULT_COEFFICIENTS)
        result = fit(args.path)
        print("# default coefficients:\n" + format_rows(before))
        print(f"\n# fitted {json.dumps(result['coefficients'])}:\n" + format_rows(check(args.path)))
        print(f"\nmax |error| {100 * result['max_abs_rel_error']:.1f}%, all within tolerance: "
              f"{result['all_within_tolerance']}, T4 verdicts agree: {result['t4_verdicts_agree']}")
        return 0
    if args.cmd == "check":
        rows = check(args.path, memory.DEFAULT_COEFFICIENTS if args.defaults else None)
        if not rows:
            print(f"{args.path}: no measured records")
            return 0
        print(format_rows(rows))
        ok = all(r["within"] and r["t4_measured_fits"] == r["t4_predicted_fits"] for r in rows)
        return 0 if ok else 1
    for p in GRID:
        pr = plan(SHAPES[p.shape], gpu="H200", seq_len=p.seq_len, batch_size=p.batch_size, lora_rank=p.lora_rank,
                  dtype=p.dtype, load_in_4bit=p.load_in_4bit, gradient_checkpointing=p.gradient_checkpointing,
                  optimizer=p.optimizer)
        print(f"{p.label():<58} predicted {pr.reserved_gib:6.2f} GiB")
    print(f"{len(GRID)} configurations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
