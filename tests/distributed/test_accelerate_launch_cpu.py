"""``accelerate launch --multi_gpu --num_processes 2 -m nbtune.ui.cli finetune run.yaml`` on the CPU
(accelerate's multi-GPU launcher is torchrun underneath; without a GPU the ranks use gloo): the
same run as torchrun's, with the losses of one process at the same global batch."""
import subprocess
import sys

import pytest
import yaml

import nbtune
from nbtune.train import session

from .conftest import WORLD, cpu_env, ddp_config, free_port, read_jsonl, train_records

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def test_accelerate_launch_matches_one_process(tmp_path, tiny_model_dir, ddp_data):
    cfg = ddp_config(tiny_model_dir, ddp_data, tmp_path / "accelerate")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "nbtune.ui.cli", "finetune", str(tmp_path / "run.yaml")]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter: ") == 1
    log = read_jsonl(tmp_path / "accelerate" / "metrics.jsonl")
    assert log[0]["event"] == "start" and log[0]["world_size"] == WORLD and log[0]["global_batch"] == 8
    dist = next(r for r in log if r["event"] == "distributed")
    assert dist["replicas_identical"] and dist["devices"] == ["cpu"] * WORLD

    session.clear()
    one = nbtune.finetune(ddp_config(tiny_model_dir, ddp_data, tmp_path / "one", grad_accum=2 * WORLD),
                          dashboard=False, progress=False, reuse_model=False)
    assert [r["loss"] for r in train_records(log)] == pytest.approx([r["loss"] for r in train_records(one.metrics)],
                                                                   rel=1e-5)
