"""The ``nbtune`` command (also ``python -m nbtune``).

    nbtune demo [--out DIR] [--steps N]     fine-tune the embedded model on GSM8K, live progress
    nbtune pull [NAME ...]                  fetch embedded models / data once (default: all)
    nbtune finetune RUN.yaml [--set k=v] [--plan] [--dry-run] [--resume] [--force]
                                            run a config file (the same config as %%finetune)
    nbtune plan MODEL [--gpu colab-t4 ...]  will it fit the GPU and the host RAM? breakdown, advice (no GPU needed)
    nbtune export RUN_DIR --format gguf --quant q8_0 [--out DIR]
                                            a finished run as gguf (llama.cpp / Ollama / LM Studio),
                                            merged (16-bit safetensors) or adapter
    nbtune --version                        nbtune's version and its stack's (torch, transformers, ...)

Several GPUs (data parallel, DDP): start the same command under a standard launcher; every process
trains on its own GPU, and rank 0 alone prints, logs and saves. ``train.batch_size`` is per GPU;
the global batch is batch_size x grad_accum x GPUs.

    torchrun --nproc_per_node 2 -m nbtune.ui.cli finetune run.yaml
    accelerate launch --multi_gpu --num_processes 2 -m nbtune.ui.cli finetune run.yaml
"""
from __future__ import annotations

import argparse
import sys

from .fixable import fixable_kind


def cmd_pull(args) -> int:
    from ..assets import known_names, pull

    for name in args.names or known_names():
        print(f"{name}: {pull(name)}")
    return 0


def cmd_demo(args) -> int:
    from ..train import finetune
    from ..train.demo import demo_config

    overrides = {"train": {"max_steps": args.steps}} if args.steps is not None else {}
    cfg = demo_config(args.out, **overrides)
    print(f"nbtune demo: {cfg.model.name} on {cfg.data.source}, {cfg.train.max_steps} steps -> {cfg.output.dir}",
          file=sys.stderr)
    result = finetune(cfg)
    print(result.summary())
    if result.eval_loss_before is not None and result.eval_loss_after is not None:
        verdict = "lower" if result.eval_loss_after < result.eval_loss_before else "NOT lower"
        print(f"held-out loss after training is {verdict} than before")
    return 0


def cmd_finetune(args) -> int:
    """The CLI door: the same config and the same run as %%finetune and nbtune.finetune()."""
    from ..train.distributed import is_main_process
    from .api import finetune

    cfg = config_from_args(args)
    result = finetune(cfg, plan=args.plan, dry_run=args.dry_run, resume=args.resume, force=args.force,
                      gpu=args.gpu, dashboard=False)
    if not is_main_process():  # data parallel: rank 0 reports for all
        return 130 if getattr(result, "interrupted", False) else 0
    if args.plan or args.dry_run:
        print(result if result is not None else "nbtune: no plan (the planner is not available)")
        return 0
    print(result.summary())
    return 130 if result.interrupted else 0


def cmd_plan(args) -> int:
    import json

    from ..planner import plan

    targets = args.targets if "," not in args.targets else [t.strip() for t in args.targets.split(",") if t.strip()]
    p = plan(args.model, gpu=args.gpu, seq_len=args.seq_len, batch_size=args.batch_size, lora_rank=args.rank,
             lora_targets=targets, dtype=args.dtype, load_in_4bit=not args.no_4bit,
             gradient_checkpointing=args.checkpointing, optimizer=args.optimizer, loss=args.loss,
             world_size=args.num_gpus, host_ram_gib=_host_ram(args.host_ram), offload_layers=args.offload_layers,
             data_rows=args.data_rows, data_tokens_per_row=args.data_tokens)
    if args.json:
        print(json.dumps(p.to_dict(), indent=1))
        return 0
    print(repr(p))
    if args.suggest or not p.fits:
        print(p.suggest())
    if args.yaml:
        print(p.to_yaml(magic=True), end="")
    return 0


def _host_ram(value):
    """--host-ram: None, "auto", or a number of GiB."""
    if value is None or value.strip().lower() == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        from ..planner import PlannerError

        raise PlannerError(f"--host-ram {value!r}: a number of GiB (e.g. 12.7) or auto (this machine's RAM)") from None


def cmd_export(args) -> int:
    """A finished run folder as GGUF (+ Ollama Modelfile), a merged checkpoint, or the adapter."""
    from ..export.api import export_run

    path = export_run(args.run_dir, args.format, quant=args.quant, out=args.out, dtype=args.dtype)
    print(path)
    if args.format == "gguf":
        modelfile = path.with_suffix(".Modelfile")
        if modelfile.is_file():
            print(f"Ollama: cd {path.parent} && ollama create {path.stem} -f {modelfile.name}", file=sys.stderr)
    return 0


def config_from_args(args):
    """``nbtune finetune``'s config: the YAML file with each ``--set`` applied (as ``%%finetune`` does),
    and ``--overwrite`` as ``output.overwrite: true``."""
    from .overrides import apply_overrides

    return apply_overrides(args.config, [*(args.set or []), *(["output.overwrite=true"] if args.overwrite else [])])


class _Version(argparse.Action):
    """``--version``: nbtune's version and the stack's, one per line (argparse's own version
    action would re-wrap them into one paragraph), read without importing the stack."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..versions import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nbtune", description="Notebook-first QLoRA/LoRA fine-tuning")
    ap.add_argument("--version", action=_Version, help="show nbtune's version and its stack's, then exit")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fine-tune the embedded model on GSM8K with live progress")
    p.add_argument("--out", default="outputs/demo", help="output directory (adapter, metrics.jsonl)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: sized to the machine)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("pull", help="fetch embedded models / data sets into the cache")
    p.add_argument("names", nargs="*", help="names to fetch (default: all)")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser(
        "finetune", help="run a YAML config (the same schema as %%finetune)",
        description="Run a YAML config (the same schema as %%finetune and nbtune.finetune()).",
        epilog="Several GPUs (data parallel): torchrun --nproc_per_node N -m nbtune.ui.cli finetune run.yaml, or "
               "accelerate launch --multi_gpu --num_processes N -m nbtune.ui.cli finetune run.yaml. Each process "
               "loads the model on its own GPU; train.batch_size is per GPU and the global batch is batch_size x "
               "grad_accum x N; rank 0 alone prints, logs and saves.")
    p.add_argument("config", help="path to a .yaml config")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--plan", action="store_true", help="show the memory plan only (nothing is loaded)")
    p.add_argument("--dry-run", action="store_true", help="check config, plan, tokenizer and data; no training")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")
    p.add_argument("--force", action="store_true", help="train even if the planner predicts it will not fit")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in output.dir (output.overwrite: true; only nbtune's files are deleted)")
    p.add_argument("--gpu", default=None, help="GPU to plan for (default: this one, or T4 without a GPU)")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("plan", help="predict GPU memory for a fine-tune: breakdown, fits or not, advice")
    p.add_argument("model", help="catalog name (e.g. llama-3.1-8b), local checkpoint dir / config.json, or hub id")
    p.add_argument("--gpu", default="T4",
                   help="a platform (colab-t4, kaggle-t4x2, kaggle-p100, colab-l4, colab-a100: GPU and host RAM), a GPU "
                        "(T4, L4, A10G, A100 40GB, H100, ...: host RAM not checked unless --host-ram) or auto (this machine)")
    p.add_argument("--host-ram", default=None, metavar="GIB",
                   help="the host's RAM in GiB, or auto (this machine's), for a GPU without a platform")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--targets", default="all-linear", help="LoRA target modules: all-linear or a comma list")
    p.add_argument("--dtype", default="auto", help="auto, float16, bfloat16, float32")
    p.add_argument("--no-4bit", action="store_true", help="16-bit base weights instead of 4-bit NF4")
    p.add_argument("--checkpointing", default="auto", choices=["auto", "offload", "plain", "off"],
                   help="gradient checkpointing; auto: offload on one GPU (as many layers as the host's RAM holds), "
                        "with --num-gpus > 1 plain where it fits")
    p.add_argument("--offload-layers", type=int, default=None, metavar="N",
                   help="with --checkpointing offload: offload only the first N layers' inputs (the rest plain)")
    p.add_argument("--data-rows", type=int, default=None, help="training rows, for the host-RAM estimate")
    p.add_argument("--data-tokens", type=int, default=None, metavar="N",
                   help="tokens per row (at most --seq-len), for the host-RAM estimate")
    p.add_argument("--optimizer", default="adamw_8bit", choices=["adamw_8bit", "paged_adamw_8bit", "adamw", "sgd"])
    p.add_argument("--loss", default="auto", choices=["auto", "fused", "unfused"])
    p.add_argument("--num-gpus", type=int, default=1,
                   help="data-parallel GPUs: figures stay per GPU, the plan states the global batch")
    p.add_argument("--suggest", action="store_true", help="also print the largest batch / seq_len that fit")
    p.add_argument("--yaml", action="store_true", help="also print the matching %%%%finetune cell")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("export", help="export a finished run: gguf (llama.cpp / Ollama / LM Studio), merged, adapter",
                       description="Export a finished run folder (its output.dir): gguf writes one .gguf file and an "
                                   "Ollama Modelfile; merged writes a 16-bit safetensors checkpoint shard by shard.")
    p.add_argument("run_dir", help="the run's output.dir (holds run.yaml and adapter/)")
    p.add_argument("--format", default="gguf", choices=["gguf", "merged", "adapter"])
    p.add_argument("--quant", default=None, choices=["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"],
                   help="GGUF weights (default: the run's output.gguf_quant, q8_0); k-quants need llama.cpp's quantizer")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16"],
                   help="merged weights (default: the run's output.merged_dtype)")
    p.add_argument("--out", default=None, help="where to write (default: RUN_DIR/<format>)")
    p.set_defaults(func=cmd_export)
    return ap


def main(argv=None) -> int:
    """Errors the user fixes (nbtune.ui.fixable) end with their message and exit 2 (bad input, or the
    planner's no) or 1 (the run started and stopped: out of GPU memory, NaN/inf); others keep their
    traceback. ``nbtune plan`` imports no torch."""
    from ..quiet import apply as quiet_third_party

    quiet_third_party()  # before transformers / peft / bitsandbytes are imported (nbtune/quiet.py)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("nbtune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        kind = fixable_kind(e)
        if kind is None:
            raise
        text = str(e)
        if kind == "input":  # one line: "invalid nbtune config: train.lr: ...; lora.r: ..."
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            text = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")
        print(f"nbtune: error: {text}", file=sys.stderr)
        return 1 if kind == "run" else 2


if __name__ == "__main__":
    sys.exit(main())
