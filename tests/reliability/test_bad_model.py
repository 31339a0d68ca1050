"""A model that nbtune cannot use as given (issue 8) is rejected with one paragraph naming the
model folder or id, what is wrong and the fix, before the model loads and before anything is
written (``world.check()``): weights only as pickle files, no tokenizer."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

import nbtune
from nbtune.models import ModelLoadError

from .conftest import one_line, rejected, run_cli, snapshot


@pytest.fixture
def no_model_load(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded"))


def copy_model(world, name, skip=()):
    """A copy of the tiny model folder without the files in ``skip``, in the world (which must keep
    it unchanged from then on)."""
    folder = world.root / name
    folder.mkdir()
    for f in world.model_dir.iterdir():
        if f.name not in skip:
            shutil.copy(f, folder / f.name)
    world.before = snapshot(world.root)
    return folder


def pickle_model(world, extra=None):
    """The tiny model with its weights saved by torch.save as pytorch_model.bin (a real pickle
    file), no safetensors. ``extra``: one more entry in the pickled dict (a numpy array makes
    torch's weights_only loader refuse the file: "Weights only load failed")."""
    folder = copy_model(world, "pickled", skip=("model.safetensors",))
    state = load_file(world.model_dir / "model.safetensors")
    if extra is not None:
        state["extra"] = extra
    torch.save(state, folder / "pytorch_model.bin")
    world.before = snapshot(world.root)
    return folder


@pytest.mark.parametrize("extra", ["plain state dict", "numpy inside"])
def test_pickle_only_weights_are_refused_with_the_conversion(world, no_model_load, extra, capsys):
    import numpy as np

    folder = pickle_model(world, extra=np.zeros(3) if extra == "numpy inside" else None)
    cfg = world.config(model={"name": str(folder)})
    msg = rejected(world, cfg)
    for needle in (str(folder), "pytorch_model.bin", "safetensors only", "pickle file can run code",
                   "save_pretrained(", "safe_serialization=True", "environment you trust"):
        assert needle in msg, msg
    assert "weights_only" not in msg and "Traceback" not in msg
    code, err = run_cli(world, cfg, capsys=capsys)
    assert code == 2 and "safetensors only" in one_line(err)
    with pytest.raises(ModelLoadError, match="safetensors only"):  # the Python loader says the same
        nbtune.load_model(str(folder), max_seq_length=64)
    world.check()


def test_a_folder_without_tokenizer_files_names_them_and_the_fix(world, no_model_load, capsys):
    tokenizer_files = {p.name for p in world.model_dir.iterdir() if "token" in p.name or p.suffix == ".jinja"}
    folder = copy_model(world, "no-tokenizer", skip=tokenizer_files)
    cfg = world.config(model={"name": str(folder)})
    msg = rejected(world, cfg)
    for needle in (str(folder), "has no tokenizer", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "AutoTokenizer.from_pretrained(", ".save_pretrained("):
        assert needle in msg, msg
    assert "sentencepiece" not in msg
    with pytest.raises(ModelLoadError, match="has no tokenizer"):  # the dry run too
        nbtune.finetune(cfg, dry_run=True)
    code, err = run_cli(world, cfg, "--dry-run", capsys=capsys)
    assert code == 2 and "has no tokenizer" in one_line(err)
    world.check()


@pytest.mark.parametrize("targets, bad", [(["q_projj"], "'q_projj'"), (["q_proj", "v_projj"], "'v_projj'"),
                                          ("mlp\\.nothing", "'mlp\\\\.nothing'")],
                         ids=["a typo", "one of two", "a regular expression"])
def test_lora_targets_the_model_lacks_list_its_linear_layers(world, no_model_load, targets, bad, capsys):
    cfg = world.config(lora={"targets": targets})
    msg = rejected(world, cfg)  # decided from config.json on the meta device: the weights never load
    for needle in ("lora.targets", bad, "no module of this model (llama)",
                   "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head", "'all-linear'"):
        assert needle in msg, msg
    if len(targets) == 2 and isinstance(targets, list):
        assert "'q_proj'" not in msg.split("no module")[0]  # the good one is not blamed
    code, err = run_cli(world, cfg, capsys=capsys)
    assert code == 2 and "lora.targets" in one_line(err) and "NoMatchingPeftModule" not in err
    world.check()


def test_add_lora_on_a_loaded_model_says_the_same(world):
    """A hub model is checked once loaded (add_lora), with the same message, never peft's error."""
    model, _tok = nbtune.load_model(str(world.model_dir), max_seq_length=64)
    with pytest.raises(ModelLoadError, match=r"lora.targets: 'q_projj' matches no module.*Its linear layers: q_proj"):
        nbtune.add_lora(model, r=4, targets=["q_projj"], gradient_checkpointing="off")
    assert nbtune.add_lora(model, r=4, targets=["q_proj", "v_proj"], gradient_checkpointing="off") is not None
