"""A bad config (issue 8) is rejected with a message that names the field and what is allowed
there, before anything is loaded or written: the previous run's output folder, the data file and
the config file stay byte-for-byte as they were, and no file appears (``world.check()``).

Most cases go through the CLI (exit code 2, one line on stderr); the rest through
``nbtune.finetune``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nbtune
from nbtune.models import ModelLoadError
from nbtune.train import ConfigError, build_config
from nbtune.ui.cli import main as cli_main

from .conftest import one_line, rejected, run_cli

CLI_CASES = {
    "unknown top-level key": ({"trian": {"max_steps": 3}}, ["did you mean 'train'", "allowed here: model, data"]),
    "unknown key, other library's name": ({"train": {"learning_rate": 1e-4}}, ["'train.learning_rate'",
                                                                                 "did you mean 'train.lr'"]),
    "unknown key, a typo": ({"train": {"batch_szie": 2}}, ["'train.batch_szie'", "did you mean 'train.batch_size'",
                                                           "allowed here: max_steps"]),
    "lr given as text": ({"train": {"lr": "fast"}}, ["train.lr", "float", "'fast'"]),
    "lr given as a list": ({"train": {"lr": [1e-4]}}, ["train.lr", "float", "[0.0001]"]),
    "batch size as a word": ({"train": {"batch_size": "two"}}, ["train.batch_size", "int", "'two'"]),
    "max_steps given as true": ({"train": {"max_steps": True}}, ["train.max_steps", "expected a number, not true"]),
    "fractional rank": ({"lora": {"r": 2.5}}, ["lora.r", "integer", "2.5"]),
    "zero batch size": ({"train": {"batch_size": 0}}, ["train.batch_size", "> 0"]),
    "negative grad_accum": ({"train": {"grad_accum": -4}}, ["train.grad_accum", "> 0", "-4"]),
    "negative lr": ({"train": {"lr": -1e-4}}, ["train.lr", "> 0", "-0.0001"]),
    "negative max_seq_length": ({"model": {"max_seq_length": -5}}, ["model.max_seq_length", "> 0"]),
    "rank 0": ({"lora": {"r": 0}}, ["lora.r", "> 0"]),
    "dropout 1": ({"lora": {"dropout": 1.0}}, ["lora.dropout", "< 1"]),
    "keep_checkpoints 0": ({"output": {"keep_checkpoints": 0}}, ["output.keep_checkpoints", ">= 1"]),
    "max_nonfinite_steps 0": ({"train": {"max_nonfinite_steps": 0}}, ["train.max_nonfinite_steps", "> 0"]),
    "optimizer not in the list": ({"train": {"optimizer": "adam9"}}, ["train.optimizer", "'adamw_8bit'", "'adam9'"]),
    "dtype not in the list": ({"model": {"dtype": "fp8"}}, ["model.dtype", "'float16'", "'bfloat16'", "'fp8'"]),
    "export not in the list": ({"output": {"export": ["onnx"]}}, ["output.export", "'adapter'", "'merged'", "'gguf'", "'onnx'"]),
    "eval_split out of range": ({"data": {"eval_split": 1.5}}, ["data.eval_split", "0 < x < 1", "1.5"]),
    "a section that is not a mapping": ({"train": 5}, ["train", "a mapping of max_steps", "(got 5)"]),
    "max_steps and epochs both set": ({"train": {"max_steps": 10, "epochs": 2}},
                                      ["train.max_steps", "train.epochs", "conflict"]),
    "unknown model name": ({"model": {"name": "llama-9000"}},
                           ["model.name", "'llama-9000'", "smollm2-135m-instruct", "org/name", "local checkpoint"]),
    "model name with a typo": ({"model": {"name": "smollm2-135m"}},
                               ["model.name", "did you mean 'smollm2-135m-instruct'"]),
    "missing model path": ({"model": {"name": "/no/such/model/dir"}}, ["model.name", "/no/such/model/dir",
                                                                         "does not exist"]),
    "max_seq_length above the model's limit": ({"model": {"max_seq_length": 4096}},
                                               ["model.max_seq_length=4096", "512", "max_position_embeddings",
                                                "1..512"]),
    "lr infinite": ({"train": {"lr": float("inf")}}, ["train.lr", "finite number"]),
    "alpha infinite": ({"lora": {"alpha": float("inf")}}, ["lora.alpha", "finite number"]),
    "lr not a number": ({"train": {"lr": float("nan")}}, ["train.lr", "finite number"]),
    "negative seed": ({"train": {"seed": -1}}, ["train.seed", ">= 0", "-1"]),
    "warm-up as long as the run": ({"train": {"max_steps": 3, "warmup_steps": 5}},
                                   ["train.warmup_steps (5)", "train.max_steps (3)", "never reach train.lr"]),
    "warm-up fraction not below 1": ({"train": {"warmup_steps": 1.5}}, ["train.warmup_steps", "below 1"]),
    "missing data file": ({"data": {"source": "/no/such/data.jsonl"}}, ["data.source", "/no/such/data.jsonl",
                                                                         "does not exist"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_rejects_bad_config_with_exit_2_and_one_line(case, world, capsys):
    patch, needles = CLI_CASES[case]
    cfg = world.config(**patch)
    code, err = run_cli(world, cfg, capsys=capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("nbtune: error: "), err
    for needle in needles:
        assert needle in line, line
    world.check()


@pytest.mark.parametrize("text, needles", [
    ("- model\n- data\n", ["must be a mapping of sections", "model, data, lora, train, output", "got list"]),
    ("train: {max_steps: 3\n", ["not valid YAML", "line 1"]),
], ids=["not a mapping", "broken YAML"])
def test_cli_rejects_config_text_that_is_not_a_config(text, needles, world, capsys):
    path = world.write("bad.yaml", text)
    code = cli_main(["finetune", str(path)])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and all(n in line for n in needles), line
    world.check()


def test_cli_set_is_never_evaluated_and_bad_set_exits_2(world, capsys):
    marker = world.root / "pwned"
    cfg = world.config()
    code, err = run_cli(world, cfg, "--set", f"train.lr=__import__('os').system('touch {marker}')", capsys=capsys)
    assert code == 2 and "train.lr" in one_line(err) and not marker.exists()
    code, err = run_cli(world, cfg, "--set", "train.lr", capsys=capsys)
    assert code == 2 and "section.key=value" in one_line(err)
    world.check()


def test_cli_missing_config_file(world, capsys):
    code = cli_main(["finetune", str(world.root / "nope.yaml")])
    assert code == 2 and "nope.yaml" in one_line(capsys.readouterr().err)
    world.check()


def test_the_real_command_exits_2_with_one_line(world):
    path = world.write("bad.yaml", yaml.safe_dump(world.config(lora={"r": 0})))
    proc = subprocess.run([sys.executable, "-m", "nbtune", "finetune", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "lora.r" in one_line(proc.stderr) and "Traceback" not in proc.stderr
    world.check()


# ----------------------------------------------------------------------------- output folder
def test_output_dir_that_is_a_file(world):
    target = world.write("a-file", "keep me\n")
    msg = rejected(world, world.config(output={"dir": str(target)}))
    assert "output.dir" in msg and "is a file" in msg


def test_output_dir_under_a_file(world):
    target = world.write("a-file", "keep me\n")
    msg = rejected(world, world.config(output={"dir": str(target / "run")}))
    assert "output.dir" in msg and "cannot be created" in msg


def test_unwritable_output_dir_is_found_before_the_model_loads(world, monkeypatch):
    import transformers

    loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == world.out else real_access(p, mode))
    msg = rejected(world, world.config())
    assert "output.dir" in msg and "not writable" in msg and not loads


# ----------------------------------------------------------------------------- model and resume
def test_model_dir_without_config_json(world):
    empty = world.root / "not-a-model"
    empty.mkdir()  # an empty folder: the snapshot of files is unchanged
    msg = rejected(world, world.config(model={"name": str(empty)}))
    assert "without config.json" in msg and str(empty) in msg


def test_resume_from_a_folder_that_is_not_a_checkpoint(world):
    msg = rejected(world, world.config(), resume=str(world.out / "adapter"))
    assert "resume:" in msg and "not a checkpoint folder" in msg and "trainer_state.json" in msg


def test_dry_run_checks_the_same_inputs(world):
    with pytest.raises(ModelLoadError, match="model.max_seq_length=4096"):
        nbtune.finetune(world.config(model={"max_seq_length": 4096}), dry_run=True)
    with pytest.raises(ConfigError, match="output.dir"):
        nbtune.finetune(world.config(output={"dir": str(world.data / "x")}), dry_run=True)
    world.check()


def test_epochs_alone_and_overrides_do_not_conflict():
    assert build_config(train={"epochs": 2}).train.max_steps is None
    assert build_config(build_config(train={"epochs": 2}), train={"max_steps": 5}).train.epochs is None
    assert build_config(data={"packing": True, "responses_only": False}).data.packing
    packed = build_config(data={"packing": True}).data  # packing keeps the assistant-only labels
    assert packed.packing and packed.responses_only
    assert build_config(model={"load_in_4bit": True}).model.load_in_4bit is True  # a real bool stays allowed
