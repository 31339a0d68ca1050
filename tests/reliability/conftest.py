"""Fixtures for the reliability tests (issue 8): a tiny random Llama checkpoint (tests/conftest.py;
``offline_model_dir`` here needs no download, for the GPU machine), a small data file, and a
"previous run" output folder whose every byte must survive a rejected or failed run
(``world.check()``).

Doors: ``nbtune.finetune`` (Python), ``build_config`` and the CLI (``nbtune finetune bad.yaml``:
exit code 2, one line on stderr). Real runs here are 1-6 steps of the tiny model on a CPU.
"""
import json
import os
from pathlib import Path

import pytest
import yaml

import nbtune
from nbtune.models import ModelLoadError
from nbtune.train import ConfigError, DataError
from nbtune.ui.cli import main as cli_main

BAD = (ConfigError, DataError, ModelLoadError)


class RaiseInForward:
    """Forward hook raising ``make_error()`` inside the ``at``-th training forward (mid-step)."""

    def __init__(self, at: int, make_error):
        self.at, self.calls, self.make_error = at, 0, make_error

    def __call__(self, module, args, output):
        if module.training:
            self.calls += 1
            if self.calls == self.at:
                raise self.make_error()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [{"prompt": f"What is {i}+{i}?", "completion": f"{i}+{i} = {2 * i}."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def offline_model_dir(tmp_path_factory):
    """A tiny random Llama (hidden 64, 2 layers, vocab 49152 like SmolLM2's, so the logits weigh
    what a real vocabulary's do) with a word-level ChatML tokenizer built in memory: needs no
    download, so the GPU tests run on a machine without network."""
    import warnings

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = ["user", "assistant", "system", "What", "is", "Count", "one", "two", "three", "+", "=", "?", ".", ":"]
    vocab = {w: i for i, w in enumerate(specials + words + [str(n) for n in range(100)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    path = tmp_path_factory.mktemp("offline-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_config(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name": str(model_dir), "max_seq_length": 64},
        "data": {"source": str(data), "eval_split": None},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 1, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0,
                  "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 1, **train},
        "output": {"dir": str(out)},
    }


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ----------------------------------------------------------------------------- "nothing was lost"
def make_previous_run(out: Path) -> None:
    """What an earlier run left: config, metrics, adapter and a complete, resumable checkpoint."""
    (out / "adapter").mkdir(parents=True)
    ckpt = out / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (out / "run.yaml").write_text("previous: run\n")
    (out / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.5}\n')
    (out / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (out / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (ckpt / "trainer_state.json").write_text('{"global_step": 2}')
    (ckpt / "nbtune.json").write_text('{"step": 2}')


def snapshot(root: Path) -> dict:
    """Every file under ``root``: relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, tiny_model_dir, tiny_data):
    """A tmp folder with a previous run in ``out/`` and a copy of the data; ``world.check()`` asserts
    that every file there is unchanged and that nothing was added."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(tiny_data.read_bytes())
    out = tmp_path / "out"
    make_previous_run(out)

    class World:
        root, model, model_dir = tmp_path, tiny_model_dir, tiny_model_dir

        def config(self, **sections):
            cfg = tiny_config(tiny_model_dir, data, out)
            for section, values in sections.items():
                merge = isinstance(values, dict) and isinstance(cfg.get(section), dict)
                cfg[section] = {**cfg[section], **values} if merge else values
            return cfg

        def write(self, name, text=None, raw=None):
            path = tmp_path / name
            path.write_bytes(raw) if raw is not None else path.write_text(text)
            self.before = snapshot(tmp_path)
            return path

        def check(self):
            assert snapshot(tmp_path) == self.before, "a rejected run changed or added files"

    w = World()
    w.data, w.out = data, out
    w.before = snapshot(tmp_path)
    yield w


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("nbtune: no CUDA GPU")]
    assert len(lines) == 1, f"expected a one-line message, got:\n{text}"
    return lines[0]


def run_cli(world, cfg, *extra, capsys):
    path = world.write("bad.yaml", yaml.safe_dump(cfg))
    capsys.readouterr()
    code = cli_main(["finetune", str(path), *extra])
    err = capsys.readouterr().err
    return code, err


def rejected(world, cfg, errors=BAD, **kwargs) -> str:
    """The message of nbtune.finetune(cfg) (a bad-input error, raised before training); asserts
    that nothing in the world changed."""
    with pytest.raises(errors) as info:
        nbtune.finetune(cfg, dashboard=False, progress=False, reuse_model=False, **kwargs)
    world.check()
    return str(info.value)
