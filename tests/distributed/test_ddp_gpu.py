"""GPU: data-parallel QLoRA on 2 GPUs (NCCL) through torchrun and through the notebook launcher:
4-bit NF4 base on each rank's own GPU, Triton kernels, offloaded checkpointing, 8-bit AdamW.

Run on the 2-GPU machine (``pytest -m gpu tests/distributed``; skipped with fewer than 2 GPUs).
The model is tests/conftest.py's word_model: a small random Llama with a 512-word tokenizer (no hub,
no embedded model needed); the data are word sequences with a learnable pattern, of different lengths. The 1-GPU reference
runs the same global batch (grad_accum doubled); its micro-batches are the ranks' micro-batches
(same rows, same shapes), so each micro-batch's loss is computed by the same kernels on the same
bits, and only the gradient sums' order differs: losses agree to 1e-2 relative.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import WORLD, read_jsonl, torchrun, train_records

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore"),
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]
HERE = Path(__file__).parent
ROWS = 64  # rows of the word model's data (tests/conftest.py word_model)


def _needs_notebook_packages():
    """The notebook doors need IPython and the dashboard's plotly (a bare GPU image may ship neither:
    benchmarks/fetch_extra_wheels.sh): skip, saying so, rather than fail on a missing package."""
    pytest.importorskip("IPython", reason="the notebook doors need IPython")
    pytest.importorskip("plotly", reason="the notebook dashboard needs plotly")


def gpu_env() -> dict:
    import os

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    for name in ("CUDA_VISIBLE_DEVICES", "NBTUNE_GPU", "TRITON_INTERPRET", "NBTUNE_KERNELS"):
        env.pop(name, None)
    return env


def config(word_model, out, **train) -> dict:
    model_dir, data = word_model
    return {
        "model": {"name": str(model_dir), "max_seq_length": 128, "load_in_4bit": True, "dtype": "bfloat16"},
        "data": {"source": str(data), "format": "text", "responses_only": False, "eval_split": None},
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": None, "epochs": 1, "batch_size": 2, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 0,
                  "optimizer": "adamw_8bit", "gradient_checkpointing": "offload", "seed": 1, "save_steps": 4,
                  "force": True, **train},
        "output": {"dir": str(out)},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, word_model):
    root = tmp_path_factory.mktemp("ddp-gpu")
    (root / "two.yaml").write_text(yaml.safe_dump(config(word_model, root / "two")))
    two = torchrun(["-m", "nbtune.ui.cli", "finetune", str(root / "two.yaml")], env=gpu_env(), timeout=400)
    (root / "one.yaml").write_text(yaml.safe_dump(config(word_model, root / "one", grad_accum=2 * WORLD)))
    env = dict(gpu_env(), CUDA_VISIBLE_DEVICES="0")
    one = subprocess.run([sys.executable, "-m", "nbtune.ui.cli", "finetune", str(root / "one.yaml")], env=env,
                         capture_output=True, text=True, timeout=400)
    return dict(root=root, two=two, one=one, word_model=word_model)


def test_torchrun_on_two_gpus(runs):
    assert runs["two"].returncode == 0, runs["two"].stderr[-4000:]
    log = read_jsonl(runs["root"] / "two" / "metrics.jsonl")
    assert log[0]["world_size"] == WORLD and log[0]["global_batch"] == 8
    assert [r["step"] for r in train_records(log)] == list(range(1, ROWS // 8 + 1))
    dist = next(r for r in log if r["event"] == "distributed")
    assert dist["devices"] == ["cuda:0", "cuda:1"]  # each rank on its own GPU
    assert dist["replicas_identical"], dist["digests"]
    assert all(g and g > 0 for g in dist["peak_reserved_gib"])
    ck = runs["root"] / "two" / "checkpoints" / "checkpoint-8"
    assert {"rng_state_0.pth", "rng_state_1.pth", "nbtune.json", "optimizer.pt"} <= {p.name for p in ck.iterdir()}


def test_two_gpus_match_one_gpu_with_the_same_global_batch(runs):
    assert runs["one"].returncode == 0, runs["one"].stderr[-4000:]
    one = train_records(read_jsonl(runs["root"] / "one" / "metrics.jsonl"))
    two = train_records(read_jsonl(runs["root"] / "two" / "metrics.jsonl"))
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]  # the same rows at every step
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-2)
    assert two[-1]["loss"] < two[0]["loss"]  # it learns


def test_resume_on_two_gpus(runs):
    """The 2-rank run continued from its step-4 checkpoint ends where the uninterrupted run did."""
    import shutil

    root = runs["root"]
    shutil.copytree(root / "two", root / "resumed")
    shutil.rmtree(root / "resumed" / "checkpoints" / "checkpoint-8")
    (root / "resumed.yaml").write_text(yaml.safe_dump(config(runs["word_model"], root / "resumed")))
    proc = torchrun(["-m", "nbtune.ui.cli", "finetune", str(root / "resumed.yaml"), "--resume"], env=gpu_env(),
                    timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    full = train_records(read_jsonl(root / "two" / "metrics.jsonl"))
    resumed = train_records(read_jsonl(root / "resumed" / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    assert [r["loss"] for r in resumed][4:] == pytest.approx([r["loss"] for r in full][4:], rel=1e-2)


def test_notebook_launcher_on_two_gpus(tmp_path, word_model):
    _needs_notebook_packages()
    (tmp_path / "cfg.json").write_text(json.dumps(config(word_model, tmp_path / "nb")))
    proc = subprocess.run([sys.executable, str(HERE / "launch_child.py"), str(tmp_path / "cfg.json"),
                           str(tmp_path / "out.json"), "cuda"], env=gpu_env(), capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rep = json.loads((tmp_path / "out.json").read_text())
    assert rep["world_size"] == WORLD and rep["steps"] == ROWS // 8 and rep["replicas_identical"] is True
    assert rep["distributed"]["devices"] == ["cuda:0", "cuda:1"]
    # (the last one may be read after the ranks exit: the tailer polls, and the run ends right after it)
    alive = [r["alive"] for r in rep["records"] if r["event"] == "train"]
    assert alive[0] and sum(alive) >= len(alive) - 1
    assert rep["training_stack_in_kernel"] == []
    assert rep["interrupted"]["interrupted"] is True and Path(rep["interrupted"]["checkpoint"]).is_dir()


def test_magic_gpus_2_in_a_fresh_kernel(tmp_path, word_model):
    """The whole notebook door: %finetune --gpus 2 in a real IPython shell that has not touched the GPU."""
    _needs_notebook_packages()
    (tmp_path / "cfg.json").write_text(json.dumps(config(word_model, tmp_path / "magic", epochs=None, max_steps=4)))
    code = (
        "import json, sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_cell('%load_ext nbtune').raise_error()\n"
        f"shell.user_ns['cfg'] = json.load(open({str(tmp_path / 'cfg.json')!r}))\n"
        "shell.run_cell('%finetune cfg --gpus 2 --no-dashboard --out run').raise_error()\n"
        "run = shell.user_ns['run']\n"
        "print(json.dumps(dict(steps=run.steps, world=run.world_size, identical=run.replicas_identical,\n"
        "                      adapter=str(run.adapter_dir), bnb='bitsandbytes' in sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=gpu_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == dict(steps=4, world=WORLD, identical=True, adapter=str(tmp_path / "magic" / "adapter"), bnb=False)
    assert "training: 4 steps on 2 processes, global batch 8 rows" in proc.stderr  # rank 0's progress, in the kernel


def test_a_kernel_with_cuda_initialised_cannot_launch():
    code = ("import torch; torch.zeros(1, device='cuda')\n"
            "from nbtune.ui.launch import LaunchError, check_launch\n"
            "try:\n    check_launch(2, flag='--gpus')\nexcept LaunchError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=gpu_env(), capture_output=True, text=True, timeout=120)
    assert "--gpus 2: CUDA is already initialised in this kernel" in proc.stdout, proc.stderr[-2000:]
    assert "Restart the kernel" in proc.stdout


def test_magic_gpus_beyond_the_machine(tmp_path, word_model):
    _needs_notebook_packages()
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext nbtune").raise_error()
    shell.user_ns["gpu_cfg"] = config(word_model, tmp_path / "x")
    n = torch.cuda.device_count()
    err = shell.run_cell(f"%finetune gpu_cfg --gpus {n + 1} --no-dashboard").error_in_exec
    assert isinstance(err, UsageError)
    assert f"--gpus {n + 1}: this machine has {n} GPU(s)" in str(err) and f"at most {n}" in str(err)
