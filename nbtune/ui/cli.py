"""The ``nbtune`` command (also ``python -m nbtune``).

    nbtune demo [--out DIR] [--steps N]     fine-tune the embedded model on GSM8K, live progress
    nbtune pull [NAME ...]                  fetch embedded models / data once (default: all)
    nbtune finetune RUN.yaml [--set k=v]    run a config file (the same config as %%finetune)
"""
from __future__ import annotations

import argparse
import sys


def cmd_pull(args) -> int:
    from ..assets import known_names, pull

    for name in args.names or known_names():
        print(f"{name}: {pull(name)}")
    return 0


def cmd_demo(args) -> int:
    from ..train import finetune
    from ..train.demo import demo_config

    overrides = {"train": {"max_steps": args.steps}} if args.steps else {}
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
    from ..train import build_config, finetune

    cfg = build_config(args.config)
    for item in args.set or []:
        cfg = build_config(cfg, **_dotted_override(item))
    result = finetune(cfg)
    print(result.summary())
    return 0


def _dotted_override(item: str) -> dict:
    """'train.lr=1e-4' -> {'train': {'lr': 1e-4}} (the value parsed as YAML, never evaluated)."""
    import yaml

    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise SystemExit(f"--set expects section.key=value, got {item!r}")
    key, value = item.split("=", 1)
    section, field = key.split(".", 1)
    return {section: {field: yaml.safe_load(value)}}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nbtune", description="Notebook-first QLoRA/LoRA fine-tuning")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fine-tune the embedded model on GSM8K with live progress")
    p.add_argument("--out", default="outputs/demo", help="output directory (adapter, metrics.jsonl)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: sized to the machine)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("pull", help="fetch embedded models / data sets into the cache")
    p.add_argument("names", nargs="*", help="names to fetch (default: all)")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("finetune", help="run a YAML config (the same schema as %%finetune)")
    p.add_argument("config", help="path to a .yaml config")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value")
    p.set_defaults(func=cmd_finetune)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..assets import AssetError
    from ..models import ModelLoadError
    from ..train import ConfigError, DataError

    try:
        return args.func(args)
    except (AssetError, ConfigError, DataError, ModelLoadError) as e:
        print(f"nbtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nbtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
