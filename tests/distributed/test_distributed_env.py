"""nbtune.train.distributed without a launch: the launcher's environment read (and refused when it
does not add up), the global-batch arithmetic, the rank-0 switches of the metrics stream, the LoRA
digest that tells replicas apart, and the planner's per-GPU figures for a data-parallel run."""
import pytest
import torch

import nbtune
from nbtune.planner import PlannerError, plan_from_config
from nbtune.train import build_config, distributed
from nbtune.train.distributed import DistributedSetupError
from nbtune.train.metrics import MetricsStream
from nbtune.train.progress import TerminalProgress


@pytest.fixture
def launcher_env(monkeypatch):
    def set_env(**values):
        for name in distributed.ENV_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


def test_outside_a_launcher_is_one_process(launcher_env):
    launcher_env()
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (1, 0, 0)
    assert not distributed.is_distributed() and distributed.is_main_process()
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert distributed.device() == expected
    distributed.barrier()  # no process group: returns at once
    assert distributed.any_rank(True) and not distributed.any_rank(False)


def test_reads_the_launchers_variables(launcher_env):
    launcher_env(WORLD_SIZE=4, RANK=3, LOCAL_RANK=1)
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (4, 3, 1)
    assert distributed.is_distributed() and not distributed.is_main_process()
    distributed.check_environment()


@pytest.mark.parametrize("env, message", [
    (dict(WORLD_SIZE="two", RANK=0), r"WORLD_SIZE='two' is not an integer"),
    (dict(WORLD_SIZE=2), r"WORLD_SIZE=2 but RANK is not set"),
    (dict(WORLD_SIZE=2, RANK=2), r"RANK=2 is not below WORLD_SIZE=2"),
    (dict(WORLD_SIZE=2, RANK=-1), r"RANK='-1' is negative"),
])
def test_a_broken_launcher_environment_is_named(launcher_env, env, message):
    launcher_env(**env)
    with pytest.raises(DistributedSetupError, match=message):
        distributed.check_environment()


def test_global_batch(launcher_env):
    cfg = build_config(train={"batch_size": 2, "grad_accum": 4})
    assert distributed.global_batch(cfg, 1) == 8 and distributed.global_batch(cfg, 2) == 16
    assert distributed.batch_description(cfg, 2) == "16 rows (batch 2 x grad_accum 4 x 2 GPUs)"
    assert distributed.batch_description(cfg, 1) == "8 rows (batch 2 x grad_accum 4)"
    launcher_env(WORLD_SIZE=2, RANK=1, LOCAL_RANK=1)
    assert distributed.global_batch(cfg) == 16


def test_only_rank_0_writes_the_metrics_file(tmp_path):
    seen = []
    quiet = MetricsStream(tmp_path / "rank1" / "metrics.jsonl", [seen.append], write=False)
    quiet.emit({"event": "train", "step": 1, "loss": 1.0})
    assert not (tmp_path / "rank1").exists() and quiet.records[0]["loss"] == 1.0
    loud = MetricsStream(tmp_path / "rank0" / "metrics.jsonl")
    loud.emit({"event": "train", "step": 1, "loss": 1.0})
    assert (tmp_path / "rank0" / "metrics.jsonl").read_text().count("\n") == 1


def test_progress_states_the_data_parallel_run():
    import io

    out = io.StringIO()
    show = TerminalProgress(out)
    show({"event": "start", "step": 0, "max_steps": 10, "world_size": 2, "global_batch": 16})
    show({"event": "distributed", "world_size": 2, "replicas_identical": True})
    show({"event": "distributed", "world_size": 2, "replicas_identical": False})
    lines = out.getvalue().splitlines()
    assert lines[0] == "training: 10 steps on 2 processes, global batch 16 rows"
    assert "identical on every rank" in lines[1] and "DIFFERENT between ranks" in lines[2]


def test_trainable_digest_tells_lora_weights_apart():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    b.bias.requires_grad_(False)
    a.bias.requires_grad_(False)
    b.bias.data += 1  # frozen weights do not count
    assert distributed.trainable_digest(a) == distributed.trainable_digest(b)
    with torch.no_grad():
        b.weight[0, 0] = torch.nextafter(b.weight[0, 0], torch.tensor(2.0))  # one ulp
    assert distributed.trainable_digest(a) != distributed.trainable_digest(b)
    reports = distributed.rank_reports(a)
    assert len(reports) == 1 and reports[0]["device"] == "cpu" and reports[0]["digest"] == distributed.trainable_digest(a)


def test_planner_figures_are_per_gpu(launcher_env):
    # one checkpointing mode for both ("auto", the default, would take plain on 2 GPUs: its own test
    # is tests/planner/test_checkpointing_choice.py)
    cfg = {"model": {"name": "llama-3.1-8b"}, "train": {"batch_size": 2, "grad_accum": 4,
                                                         "gradient_checkpointing": "offload"}}
    one = plan_from_config(cfg, gpu="H100", world_size=1)
    two = plan_from_config(cfg, gpu="H100", world_size=2)
    assert (one.global_batch, two.global_batch) == (8, 16)
    # every GPU holds the whole model; DDP's gradient buckets add one copy of the LoRA gradients
    assert two.breakdown["LoRA gradients"] == pytest.approx(2 * one.breakdown["LoRA gradients"])
    assert two.peak_gib - one.peak_gib == pytest.approx(one.breakdown["LoRA gradients"])
    assert "data parallel: 2 GPUs, global batch 16 rows" in repr(two) and "per GPU" in repr(two)
    assert "data parallel" not in repr(one) and two.to_dict()["world_size"] == 2
    launcher_env(WORLD_SIZE=2, RANK=0, LOCAL_RANK=0)  # under torchrun the plan knows the world size
    assert plan_from_config(cfg, gpu="H100").world_size == 2
    with pytest.raises(PlannerError, match="world_size must be at least 1"):
        nbtune.plan("llama-3.1-8b", gpu="H100", world_size=0)


def test_cli_plan_takes_the_number_of_gpus(capsys):
    from nbtune.ui.cli import main

    assert main(["plan", "llama-3.1-8b", "--gpu", "H100", "--num-gpus", "2"]) == 0
    assert "data parallel: 2 GPUs, global batch 4 rows (batch 2 x grad_accum 1 x 2 GPUs)" in capsys.readouterr().out
    assert main(["plan", "llama-3.1-8b", "--gpu", "H100", "--num-gpus", "0"]) == 2
