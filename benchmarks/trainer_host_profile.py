"""Host time of nbtune.finetune's steps outside the model: what the trainer path adds per step.

    python benchmarks/trainer_host_profile.py [--layers 32] [--seq 256] [--batch 1] [--steps 3:12] [--no-dashboard]
        [--packing]

The run is benchmarks/trainer.py's nbtune peer (peers/trainer_nbtune.py: metrics stream, notebook
dashboard, logging every step) on a CPU, on a random Llama small enough that the model's own
compute is small (hidden 64) but with llama3-8b's structure where per-parameter host costs come
from (32 layers: 224 LoRA-wrapped projections, 448 LoRA matrices), SmolLM2's tokenizer and
vocabulary, and GSM8K conversations, unpacked (``--packing``: packed padding-free rows). Over the
steps after the warm-up it reports:

- per step, the host milliseconds of each part of transformers' loop and of nbtune's callbacks and
  listeners (cProfile's cumulative time of the functions that implement them, divided by the
  steps; cProfile's own overhead inflates small functions alike, so compare parts, not absolutes);
- the reads of tensor values on the host (``.item()``, ``.tolist()``, ``float()``, ``int()``,
  ``bool()`` of a tensor), by the line that made them, per step: on a GPU each one whose tensor
  lives on the device is a synchronization, the host waiting for every kernel queued before it;
- the functions with the most own time outside torch's operators.

Absolute figures are this CPU's (and cProfile's); the GPU host's Python is faster. What matters is
which parts cost what per step and which of them run every step whatever the model.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import sys
import statistics
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "peers")]

# (label, function names as cProfile records them: (file suffix, function name)); a part's time is
# the largest cumulative time among its functions (they nest, or only one of them runs)
PARTS = [
    ("fetch + collate the batch", [("transformers/trainer.py", "get_batch_samples")]),
    ("forward + backward (training_step)", [("transformers/trainer.py", "training_step"),
                                               ("nbtune/train/stability.py", "training_step")]),
    ("clip gradients", [("transformers/trainer.py", "_clip_grad_norm"),
                        ("nbtune/train/trainable.py", "_clip_grad_norm")]),
    ("on_pre_optimizer_step callbacks (NaN/inf guard)", [("nbtune/train/stability.py", "on_pre_optimizer_step")]),
    ("optimizer.step", [("accelerate/optimizer.py", "step")]),
    ("scheduler.step", [("torch/optim/lr_scheduler.py", "step")]),
    ("model.zero_grad", [("torch/nn/modules/module.py", "zero_grad"), ("nbtune/train/trainable.py", "__call__")]),
    ("on_step_begin / on_step_end callbacks", [("transformers/trainer_callback.py", "on_step_end"),
                                                 ("transformers/trainer_callback.py", "on_step_begin")]),
    ("log / save / evaluate (_maybe_log_save_evaluate)", [("transformers/trainer.py", "_maybe_log_save_evaluate")]),
    ("  Trainer.log (fold token count, speed metrics, on_log)", [("nbtune/train/token_count.py", "log")]),
    ("    MetricsStream.on_log (record, VRAM, write, listeners)", [("nbtune/train/metrics.py", "on_log")]),
    ("      MetricsStream.emit: JSON line appended to metrics.jsonl", [("nbtune/train/metrics.py", "emit")]),
    ("      Dashboard.update (redraw at most once a second)", [("nbtune/ui/dashboard.py", "update")]),
    ("        Dashboard.render: figure + MIME bundle", [("nbtune/ui/dashboard.py", "render")]),
    ("        Dashboard.mimebundle: figure dict + HTML", [("nbtune/ui/dashboard.py", "mimebundle")]),
    ("      CollectorPauses.record_fields", [("nbtune/train/gc_pause.py", "record_fields")]),
]


def tiny_checkpoint(path: str, tokenizer_dir: str, layers: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer_data import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=224, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class ValueReads:
    """Counts reads of tensor values on the host by the line outside torch that asked for them."""

    METHODS = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self):
        self.active = False
        self.sites: collections.Counter = collections.Counter()
        self._saved = {}

    def install(self) -> None:
        import torch

        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapped(tensor, *a, _original=original, _name=name, **k):
                if self.active:
                    self.sites[(_name, self._site())] += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, wrapped)

    def uninstall(self) -> None:
        import torch

        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    @staticmethod
    def _site() -> str:
        frame, via = sys._getframe(2), ""
        while frame is not None:
            path = frame.f_code.co_filename.replace(os.sep, "/")
            if "/torch/optim/" in path:
                via = " via torch.optim (its step counters: CPU tensors on a GPU run too)"
            if "/torch/" not in path and not path.endswith("trainer_host_profile.py"):
                short = path.split("site-packages/")[-1] if "site-packages/" in path else os.path.relpath(path)
                return f"{short}:{frame.f_lineno} ({frame.f_code.co_name}){via}"
            frame = frame.f_back
        return "?"


class Window:
    """A metrics listener that profiles the steps after the warm-up (cProfile + value reads)."""

    def __init__(self, warmup: int, reads: ValueReads):
        self.warmup, self.reads = warmup, reads
        self.profile = cProfile.Profile()
        self.steps = 0
        self.on = False
        self.marks: list[float] = []

    def __call__(self, rec: dict) -> None:
        event, step = rec.get("event"), rec.get("step") or 0
        if event == "train":
            self.marks.append(time.perf_counter())
        if event == "train" and step == self.warmup and not self.on:
            self.on = True
            self.reads.active = True
            self.profile.enable()
        elif event == "train" and self.on:
            self.steps = step - self.warmup
        elif event == "end" and self.on:
            self.profile.disable()
            self.reads.active = False
            self.on = False


def part_times(stats: pstats.Stats, steps: int) -> list[tuple[str, float]]:
    out = []
    for label, funcs in PARTS:
        best = 0.0
        for (file, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
            path = file.replace(os.sep, "/")
            if any(path.endswith(suffix) and name == fname for suffix, fname in funcs):
                best = max(best, ct)
        out.append((label, 1e3 * best / max(steps, 1)))
    return out


def own_time_top(stats: pstats.Stats, steps: int, n: int) -> list[tuple[str, float, float]]:
    rows = []
    for (file, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
        path = file.replace(os.sep, "/")
        if "/torch/" in path or file == "~" or name.startswith("<built-in method torch"):
            continue
        short = path.split("site-packages/")[-1] if "site-packages/" in path else path
        rows.append((f"{short}:{line}({name})", 1e3 * tt / steps, nc / steps))
    return sorted(rows, key=lambda r: -r[1])[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", default="3:12", help="WARMUP:PROFILED steps")
    ap.add_argument("--no-dashboard", action="store_true", help="metrics stream only (the terminal door)")
    ap.add_argument("--packing", action="store_true", help="data.packing: true (padding-free rows)")
    ap.add_argument("--assets", default="", help="as benchmarks/trainer.py --assets")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--callers", nargs="*", default=[], help="also print the callers of functions matching these")
    ap.add_argument("--callees", nargs="*", default=[], help="also print what functions matching these call")
    args = ap.parse_args(argv)
    warmup, steps = (int(x) for x in args.steps.split(":"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    torch.set_num_threads(1)
    import nbtune
    from trainer_data import resolve_assets, write_data
    from trainer_nbtune import finetune_config, notebook_dashboard

    work = tempfile.mkdtemp(prefix="nbtune-host-profile-")
    tokenizer_dir, gsm8k = resolve_assets(args.assets or None)
    data = write_data(work, tokenizer_dir, gsm8k, text_rows=2, text_lo=64, text_hi=128, chat_rows=256)
    model = tiny_checkpoint(os.path.join(work, "model"), tokenizer_dir, args.layers)
    run = argparse.Namespace(model=model, data=data["gsm8k"]["path"], seq=args.seq, batch=args.batch,
                             packing=args.packing,
                             dtype="float32",
                             warmup=warmup, steps=steps, out=os.path.join(work, "out"))
    reads = ValueReads()
    reads.install()
    window = Window(warmup, reads)
    dash = False if args.no_dashboard else notebook_dashboard()
    try:
        result = nbtune.finetune(finetune_config(run, "messages"), dashboard=dash, listeners=[window], progress=False)
    finally:
        reads.uninstall()
    n = window.steps
    stats = pstats.Stats(window.profile)
    lora = sum(1 for name, _ in result.model.named_parameters() if "lora_" in name)
    listening = "metrics stream only" if args.no_dashboard else "dashboard + metrics stream"
    print(f"# nbtune.finetune on the CPU: {args.layers} layers (hidden 64, {lora} LoRA matrices), batch {args.batch} x "
          f"seq {args.seq}, gsm8k {'packed' if args.packing else 'unpacked'}, {listening}, {n} profiled steps after "
          f"{warmup} warm-up; gradient checkpointing {result.gradient_checkpointing}")
    if dash:
        print(f"# dashboard: {dash.renders} redraws in the run, {dash.shown_bytes / max(dash.renders, 1) / 1e3:.0f} kB "
              "of JSON per redraw")
    walls = [b - a for a, b in zip(window.marks[warmup - 1:], window.marks[warmup:])] if warmup else []
    if walls:
        print(f"# median wall per profiled step (cProfile on): {1e3 * statistics.median(walls):.0f} ms")
    print("\n## host ms per step, by part (cProfile cumulative)")
    for label, ms in part_times(stats, n):
        print(f"{ms:10.2f}  {label}")
    print("\n## tensor values read on the host, per step (a device sync each where the tensor is on the GPU)")
    for (method, site), count in sorted(reads.sites.items(), key=lambda kv: -kv[1]):
        print(f"{count / max(n, 1):8.2f}  .{method.strip('_')}  {site}")
    print(f"\n## top {args.top} functions by own time outside torch, ms per step (calls per step)")
    for name, ms, calls in own_time_top(stats, max(n, 1), args.top):
        print(f"{ms:10.3f}  ({calls:7.1f})  {name}")
    for pattern in args.callers:  # one at a time: pstats applies several restrictions in turn
        stats.print_callers(pattern)
    for pattern in args.callees:
        stats.sort_stats("cumulative").print_callees(pattern)
    return 0


if __name__ == "__main__":
    sys.exit(main())
