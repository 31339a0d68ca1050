"""Fixtures for the data-parallel tests (issue 9): a small data file, configs for the tiny random
Llama (tests/conftest.py), and real launches: ``torchrun`` (``python -m torch.distributed.run``)
of ``nbtune finetune`` with the gloo backend on the CPU, and accelerate's notebook_launcher in a
fresh interpreter.

Why a 1-process and a 2-process run see the same rows at every step (so their losses must match):
accelerate shards a map-style dataset by handing out whole per-device batches of one sampler
order, batch k of the order to rank k mod world; the order comes from the seeded sampler
(``train.seed``), whatever the world size. With the per-device batch b, grad_accum g and 2 ranks,
optimizer step s reads batches 2gs .. 2g(s+1)-1, i.e. rows 2bgs .. 2bg(s+1)-1 of the order, the
same rows as one process with batch b and grad_accum 2g. The losses are normalised by the token
count of the whole global batch (transformers' ``num_items_in_batch``, gathered over ranks), and
DDP averages gradients over ranks, so the gradient is the same sum; dropout is 0, fp32 on the CPU;
the row count (32) is a multiple of the global batch (8), so no rank pads its last batch.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROWS = 32
WORLD = 2


@pytest.fixture(scope="session")
def ddp_data(tmp_path_factory):
    """32 prompt/completion rows of different lengths (so per-device padding differs between runs)."""
    path = tmp_path_factory.mktemp("ddp-data") / "sums.jsonl"
    rows = [{"prompt": f"What is {i}+{3 * i}?", "completion": f"{i}+{3 * i} = {4 * i}." + " Yes." * (i % 5)}
            for i in range(ROWS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ddp_config(model_dir, data, out, **train) -> dict:
    """One epoch of the tiny model; with batch 2 x grad_accum 2 x 2 ranks = 8 rows per step: 4 steps."""
    return {
        "model": {"name": str(model_dir), "max_seq_length": 64, "load_in_4bit": False},
        "data": {"source": str(data), "eval_split": None},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": None, "epochs": 1, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 0,
                  "gradient_checkpointing": "offload", "optimizer": "adamw", "seed": 1, "save_steps": 2, **train},
        "output": {"dir": str(out)},
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict:
    """The environment of a child run: offline, no GPU, one thread per process, gloo on loopback."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    env.pop("NBTUNE_GPU", None)
    return env


def torchrun(args: list[str], nproc: int = WORLD, env: dict | None = None, timeout: int = 180):
    """``python -m torch.distributed.run --nproc_per_node N <args>``: the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def train_records(records) -> list[dict]:
    return [r for r in records if r.get("event") == "train" and r.get("loss") is not None]
