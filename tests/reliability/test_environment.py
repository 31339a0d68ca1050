"""The machine a run lands on (issue 8): no GPU (a CPU run, with a note saying what that means),
bf16 asked for on a GPU without it (fp16, with a note), bitsandbytes missing or broken (a message
with the fix, before anything loads or is written)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import nbtune
from nbtune.models import ModelLoadError
from nbtune.models.loader import choose_dtype, resolve_dtype
from nbtune.train import build_config
from nbtune.train.environment import check_bitsandbytes, cpu_changes, cpu_note

from .conftest import rejected


# ----------------------------------------------------------------------------- no GPU
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: needs a machine without CUDA")
def test_a_cpu_run_says_it_runs_on_the_cpu_and_what_falls_back(world, capfd):
    cfg = world.config(model={"load_in_4bit": True}, train={"optimizer": "adamw_8bit", "max_steps": 1},
                       output={"dir": str(world.root / "cpu-run")})
    result = nbtune.finetune(cfg, dashboard=False, progress=False, reuse_model=False)
    err = capfd.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("nbtune: no CUDA GPU here")]
    assert len(notes) == 1, err
    note = notes[0]
    assert "training on the CPU in float32" in note and "too slow for a 7-8B model" in note
    assert "model.load_in_4bit: true -> full-precision weights" in note
    assert "train.optimizer: adamw_8bit -> adamw" in note
    assert result.steps == 1 and (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_the_cpu_note_names_only_what_changes():
    plain = build_config(train={"optimizer": "adamw"}, model={"load_in_4bit": False})
    assert cpu_changes(plain) == [] and cpu_note(plain).endswith("T4 GPU)")
    assert "in bfloat16" in cpu_note(build_config(model={"dtype": "bfloat16"}))
    assert cpu_changes(build_config()) == ["train.optimizer: adamw_8bit -> adamw (8-bit optimizers need a CUDA GPU)"]


# ----------------------------------------------------------------------------- bf16 without bf16
@pytest.mark.parametrize("requested, capability, dtype, noted", [
    ("bfloat16", (7, 5), torch.float16, True),  # T4: no bf16 -> fp16 with a note
    ("bf16", (7, 0), torch.float16, True),  # V100
    ("bfloat16", (8, 0), torch.bfloat16, False),  # A100
    ("bfloat16", None, torch.bfloat16, False),  # a CPU runs bf16
    ("auto", (7, 5), torch.float16, False),  # auto never asks for bf16 where there is none
    ("auto", (8, 6), torch.bfloat16, False),
    ("auto", None, torch.float32, False),
    ("float16", (9, 0), torch.float16, False),
    (torch.bfloat16, (6, 1), torch.float16, True),
])
def test_choose_dtype_falls_back_from_bf16_with_a_note(requested, capability, dtype, noted):
    chosen, note = choose_dtype(requested, capability)
    assert chosen == dtype
    assert (note is not None) == noted
    if noted:
        major, minor = capability
        assert f"compute capability {major}.{minor}" in note and "has no bf16" in note
        assert "float16 with loss scaling" in note and "model.dtype: bfloat16" in note


def test_an_unknown_dtype_names_the_field():
    with pytest.raises(ModelLoadError, match=r"model.dtype: 'fp8' is not one of auto, float16, bfloat16"):
        choose_dtype("fp8", (8, 0))


def test_the_loader_asks_the_device_and_prints_the_note(monkeypatch, capsys):
    """resolve_dtype (what load_model uses) reads the GPU's capability and says the fallback."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.float16
    err = capsys.readouterr().err
    assert err.startswith("nbtune: model.dtype: bfloat16 was asked for") and "7.5" in err
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert capsys.readouterr().err == ""


def test_the_planner_agrees_on_the_fallback():
    plan = nbtune.plan("llama-3.1-8b", gpu="T4", dtype="bfloat16", seq_len=512, batch_size=1)
    assert plan.settings.dtype == "float16" and any("no bf16" in n for n in plan.notes)


# ----------------------------------------------------------------------------- bitsandbytes
def test_bitsandbytes_missing_on_a_gpu_is_reported_before_anything_loads(world, monkeypatch):
    import transformers

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded without bitsandbytes"))
    msg = rejected(world, world.config())
    assert "4-bit loading (model.load_in_4bit" in msg and "missing or broken" in msg
    assert "pip install -U bitsandbytes" in msg and "model.load_in_4bit: false" in msg
    msg = rejected(world, world.config(model={"load_in_4bit": False}, train={"optimizer": "adamw_8bit"}))
    assert "train.optimizer: adamw_8bit needs bitsandbytes" in msg and "train.optimizer: adamw" in msg


def test_bitsandbytes_is_not_asked_for_where_it_is_not_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    no_bnb = build_config(model={"load_in_4bit": False}, train={"optimizer": "adamw"})
    check_bitsandbytes(no_bnb, cuda=True)
    check_bitsandbytes(build_config(), cuda=False)  # a CPU run uses neither 4-bit nor 8-bit optimizers
    with pytest.raises(ModelLoadError, match="pip install -U bitsandbytes"):
        check_bitsandbytes(build_config(), cuda=True)


BNB_SCRIPT = textwrap.dedent("""
    import json, sys
    {block}
    import nbtune
    from nbtune.models import ModelLoadError
    try:
        nbtune.finetune(json.loads(sys.argv[1]), dashboard=False, progress=False)
    except ModelLoadError as e:
        print("MESSAGE:", e)
""")


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_bitsandbytes_missing_or_broken_says_the_fix(world, how, tmp_path_factory):
    """A pre-quantized (bitsandbytes) checkpoint needs bitsandbytes even on a CPU: without it, the
    message says what is wrong and how to fix it, and nothing is written. A broken install breaks
    transformers' and peft's own import: caught where nbtune imports them."""
    model = tmp_path_factory.mktemp("bnb-model")
    for f in world.model_dir.iterdir():  # a whole checkpoint folder (weights, tokenizer), its config marked
        if f.name != "config.json":
            shutil.copy(f, model / f.name)
    config = json.loads((world.model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model / "config.json").write_text(json.dumps(config))
    env = dict(os.environ)
    if how == "missing":
        block = "sys.modules['bitsandbytes'] = None  # import bitsandbytes -> ImportError"
    else:
        fake = tmp_path_factory.mktemp("fake-bnb")
        (fake / "bitsandbytes").mkdir()
        (fake / "bitsandbytes" / "__init__.py").write_text("raise OSError('libbitsandbytes_cuda.so: cannot open')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(fake), env.get("PYTHONPATH", "")])
        block = ""
    cfg = world.config(model={"name": str(model)})
    proc = subprocess.run([sys.executable, "-c", BNB_SCRIPT.format(block=block), json.dumps(cfg)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert "MESSAGE:" in proc.stdout, proc.stdout + proc.stderr
    msg = proc.stdout.split("MESSAGE:", 1)[1]
    assert "bitsandbytes" in msg and "pip install -U bitsandbytes" in msg and "model.load_in_4bit: false" in msg
    if how == "broken":
        assert "libbitsandbytes_cuda.so" in msg and "pip uninstall bitsandbytes" in msg
    else:  # nothing to uninstall
        assert "pip uninstall" not in msg
    world.check()
