"""``nbtune plan ...`` prints the same breakdown as Plan's repr."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nbtune.planner import plan
from nbtune.ui.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_cli_prints_the_plans_repr(capsys):
    assert main(["plan", "llama-3.1-8b", "--gpu", "T4", "--seq-len", "2048", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    expected = repr(plan("llama-3.1-8b", gpu="T4", seq_len=2048, batch_size=1))
    assert out.startswith(expected + "\n")
    for term in ("base weights (NF4 + quant constants)", "embedding + LM head", "LoRA parameters", "LoRA gradients",
                 "optimizer states", "activations", "loss chunk", "allocator overhead", "CUDA context",
                 "peak on the GPU"):
        assert term in out
    assert "FITS" in out


def test_cli_options_reach_the_plan(capsys):
    args = ["plan", "qwen2.5-7b", "--gpu", "T4", "--seq-len", "4096", "--batch-size", "2", "--rank", "64",
            "--targets", "q_proj,k_proj,v_proj,o_proj", "--dtype", "bfloat16", "--no-4bit", "--checkpointing", "plain",
            "--optimizer", "adamw"]
    assert main(args) == 0
    out = capsys.readouterr().out
    p = plan("qwen2.5-7b", gpu="T4", seq_len=4096, batch_size=2, lora_rank=64,
             lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], dtype="bfloat16", load_in_4bit=False,
             gradient_checkpointing="plain", optimizer="adamw")
    assert out.startswith(repr(p))
    assert "DOES NOT FIT" in out and "Smallest change that fits" in out  # advice printed when it does not fit


def test_cli_suggest_yaml_and_json(capsys):
    assert main(["plan", "llama-3.2-1b", "--suggest", "--yaml"]) == 0
    out = capsys.readouterr().out
    assert "Largest batch size" in out and "%%finetune\nmodel:" in out
    from nbtune.train import build_config

    cfg = build_config(out.split("%%finetune\n", 1)[1])
    assert cfg.model.name == "meta-llama/Llama-3.2-1B-Instruct"
    assert main(["plan", "llama-3.2-1b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["gpu"] == "T4" and set(data["breakdown_gib"]) >= {"activations"}


def test_cli_errors_are_short(capsys):
    assert main(["plan", "no-such-model"]) == 2
    assert "not in the planner's catalog" in capsys.readouterr().err
    assert main(["plan", "llama-3.1-8b", "--gpu", "TPU"]) == 2


def test_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "nbtune", "plan", "smollm2-135m", "--batch-size", "4"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "nbtune plan: smollm2-135m on T4" in out.stdout and "FITS" in out.stdout


@pytest.mark.parametrize("existing", ["demo", "pull", "finetune"])
def test_existing_subcommands_are_still_there(existing):
    from nbtune.ui.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([existing, "--help"])
    assert info.value.code == 0
