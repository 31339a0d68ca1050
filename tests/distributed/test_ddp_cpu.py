"""``torchrun --nproc_per_node 2 -m nbtune.ui.cli finetune run.yaml`` on the CPU (gloo): the control
flow of a data-parallel run, and the same losses as one process with the same global batch.

One real 2-process run (tiny random Llama, 32 rows, 1 epoch, global batch 8 = batch 2 x grad_accum
2 x 2 ranks, checkpoints every 2 steps) and one real 1-process run (batch 2 x grad_accum 4) of the
same config; why their steps see the same rows: tests/distributed/conftest.py.
"""
import pytest
import yaml
from safetensors.torch import load_file

import nbtune
from nbtune.train import session

from .conftest import ROWS, WORLD, cpu_env, ddp_config, read_jsonl, torchrun, train_records

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, ddp_data):
    root = tmp_path_factory.mktemp("ddp")
    cfg2 = ddp_config(tiny_model_dir, ddp_data, root / "two")
    (root / "two.yaml").write_text(yaml.safe_dump(cfg2))
    two = torchrun(["-m", "nbtune.ui.cli", "finetune", str(root / "two.yaml")])
    session.clear()
    one = nbtune.finetune(ddp_config(tiny_model_dir, ddp_data, root / "one", grad_accum=2 * WORLD),
                          dashboard=False, progress=False, reuse_model=False)
    return dict(root=root, two=two, one=one, log2=root / "two" / "metrics.jsonl")


def test_torchrun_exits_0_and_only_rank_0_writes(runs):
    two, out = runs["two"], runs["root"] / "two"
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("adapter: ") == 1  # one summary: rank 0's
    # rank 0's files, with the record of what nbtune wrote and the folder's write lock
    assert sorted(p.name for p in out.iterdir()) == [".nbtune-run.json", ".nbtune.lock", "adapter", "checkpoints",
                                                     "metrics.jsonl", "run.yaml"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # no staging folder left
    for ck in ckpts.iterdir():
        names = {p.name for p in ck.iterdir()}
        # rank 0 saved the adapter and the optimizer once; each rank its own RNG state
        assert {"nbtune.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json",
                "rng_state_0.pth", "rng_state_1.pth"} <= names
    starts = [r for r in read_jsonl(runs["log2"]) if r["event"] == "start"]
    assert len(starts) == 1  # one writer


def test_global_batch_is_reported(runs):
    start = read_jsonl(runs["log2"])[0]
    assert start["event"] == "start" and start["world_size"] == WORLD and start["global_batch"] == 2 * 2 * WORLD
    # the config names its checkpointing: kept under data parallelism too ("auto" would choose)
    assert start["gradient_checkpointing"] == "offload"
    assert start["checkpointing_reason"] == "train.gradient_checkpointing in the config"
    assert "training: 4 steps on 2 processes, global batch 8 rows" in runs["two"].stderr
    assert "data parallel: 2 processes, global batch 8 rows" in runs["two"].stdout


def test_data_is_sharded_across_ranks(runs):
    two = train_records(read_jsonl(runs["log2"]))
    # one epoch of 32 rows in global batches of 8: 4 steps (an unsharded run would take 8 per rank)
    assert [r["step"] for r in two] == list(range(1, ROWS // 8 + 1))
    # the token counts, summed over ranks by the Trainer, equal one process's at every step: the two
    # ranks read disjoint halves of the same global batches
    one = train_records(runs["one"].metrics)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]


def test_lora_weights_are_identical_on_every_rank(runs):
    rec = [r for r in read_jsonl(runs["log2"]) if r["event"] == "distributed"]
    assert len(rec) == 1 and rec[0]["world_size"] == WORLD
    assert len(rec[0]["digests"]) == WORLD and len(set(rec[0]["digests"])) == 1 and rec[0]["replicas_identical"]
    assert "LoRA weights identical on every rank" in runs["two"].stdout


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    two = train_records(read_jsonl(runs["log2"]))
    one = train_records(runs["one"].metrics)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    w1 = load_file(runs["one"].adapter_dir / "adapter_model.safetensors")
    w2 = load_file(runs["root"] / "two" / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        assert (w1[name] - w2[name]).abs().max().item() < 1e-4, name
    assert runs["one"].world_size == 1 and runs["one"].global_batch == 8


def test_dry_run_reports_the_global_batch_for_n_gpus(tiny_model_dir, ddp_data, tmp_path):
    report = nbtune.finetune(ddp_config(tiny_model_dir, ddp_data, tmp_path / "dry"), dry_run=True, world_size=WORLD)
    assert report.steps == ROWS // 8 and report.world_size == WORLD
    assert "8 rows (batch 2 x grad_accum 2 x 2 GPUs)" in report.summary()
    plan = nbtune.finetune(ddp_config(tiny_model_dir, ddp_data, tmp_path / "dry"), plan=True, world_size=WORLD)
    assert plan.world_size == WORLD and plan.global_batch == 8 and "global batch 8 rows" in repr(plan)



def test_fused_kernels_and_offloaded_checkpointing_under_ddp(runs, tiny_model_dir, ddp_data, tmp_path):
    """The Triton kernels (in Triton's interpreter) and the offloaded checkpointing under 2-process
    DDP: no hang, the same first-step loss and gradient norm as the reference kernels' 2-process run
    (the backward's gradients, all-reduced), and identical replicas after the optimizer step."""
    cfg = ddp_config(tiny_model_dir, ddp_data, tmp_path / "fused", max_steps=1, epochs=None, save_steps=None)
    (tmp_path / "fused.yaml").write_text(yaml.safe_dump(cfg))
    env = cpu_env() | {"NBTUNE_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    run = torchrun(["-m", "nbtune.ui.cli", "finetune", str(tmp_path / "fused.yaml")], env=env, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_jsonl(tmp_path / "fused" / "metrics.jsonl")
    fused, reference = train_records(records)[0], train_records(read_jsonl(runs["log2"]))[0]
    assert fused["step"] == reference["step"] == 1
    assert fused["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert fused["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-3)
    (dist,) = [r for r in records if r["event"] == "distributed"]
    assert dist["replicas_identical"] and len(set(dist["digests"])) == 1
