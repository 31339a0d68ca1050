"""``%%finetune --gpus N`` / ``nbtune.finetune(cfg, gpus=N)``: accelerate's notebook_launcher forks
the kernel into N ranks; rank 0's metrics reach the notebook's dashboard live.

The launches themselves run on 2 CPU processes (gloo) in a fresh interpreter (launch_child.py):
this pytest process has imported peft and bitsandbytes, and a kernel that has cannot launch (which
is tested here too). On this GPU-less machine the magic's ``--gpus`` can only be tested for its
errors; the GPU suite launches on 2 real GPUs (test_ddp_gpu.py).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

# the GPU machine's suite collects this folder without IPython (its tests here need none)
UsageError = pytest.importorskip("IPython.core.error").UsageError

import nbtune
from nbtune.train.checkpoint import MARKER
from nbtune.ui.launch import LaunchError, launch_finetune

from .conftest import WORLD, cpu_env, ddp_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ip():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext nbtune").raise_error()
    return shell


def cell_error(shell, code) -> BaseException:
    result = shell.run_cell(code)
    assert result.error_in_exec is not None, f"no error from {code!r}"
    return result.error_in_exec


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir, ddp_data):
    root = tmp_path_factory.mktemp("launch")
    cfg = ddp_config(tiny_model_dir, ddp_data, root / "nb")
    (root / "cfg.json").write_text(json.dumps(cfg))
    try:  # the timeout only ends a hung run (the child synchronises on files, see launch_child.py)
        proc = subprocess.run([sys.executable, str(HERE / "launch_child.py"), str(root / "cfg.json"),
                               str(root / "out.json")], env=cpu_env(), capture_output=True, text=True, timeout=840)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"launch_child.py still running after {e.timeout} s; its stderr:\n{(e.stderr or '')[-4000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(root=root, report=json.loads((root / "out.json").read_text()), stderr=proc.stderr)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a GPU-less machine")
def test_magic_gpus_beyond_the_machine_is_a_clear_error(ip, tiny_model_dir, ddp_data, tmp_path):
    ip.user_ns["ddp_cfg"] = ddp_config(tiny_model_dir, ddp_data, tmp_path / "x")
    err = cell_error(ip, "%finetune ddp_cfg --gpus 3 --no-dashboard")
    assert isinstance(err, UsageError)
    assert "--gpus 3" in str(err) and "no CUDA GPU here" in str(err) and "device_count() = 0" in str(err)
    assert not (tmp_path / "x").exists()  # nothing started, nothing written
    err = cell_error(ip, "%finetune ddp_cfg --gpus 0 --no-dashboard")
    assert isinstance(err, UsageError) and "--gpus 0" in str(err) and "at least 1" in str(err)
    with pytest.raises(LaunchError, match=r"gpus=2: there is no CUDA GPU here"):
        nbtune.finetune(ip.user_ns["ddp_cfg"], gpus=2, dashboard=False)


def test_a_kernel_with_bitsandbytes_cannot_launch(tiny_model_dir, ddp_data, tmp_path):
    import peft  # noqa: F401  (imports bitsandbytes, as any earlier single-GPU run in a kernel does)

    with pytest.raises(LaunchError, match=r"bitsandbytes is already imported in this kernel.*Restart the kernel"):
        launch_finetune(ddp_config(tiny_model_dir, ddp_data, tmp_path / "x"), WORLD, device="cpu")
    assert not (tmp_path / "x").exists()


def test_magic_dry_run_for_n_gpus_runs_in_a_fresh_process(ip, tiny_model_dir, ddp_data, tmp_path):
    ip.user_ns["ddp_cfg"] = ddp_config(tiny_model_dir, ddp_data, tmp_path / "dry")
    result = ip.run_cell("%finetune ddp_cfg --gpus 2 --dry-run --out dry")
    result.raise_error()
    text = str(ip.user_ns["dry"])
    assert "steps: 4 x 8 rows (batch 2 x grad_accum 2 x 2 GPUs)" in text and "global batch" in text
    assert "<pre" in ip.user_ns["dry"]._repr_html_()


def test_notebook_launcher_trains_on_two_processes(launched):
    rep = launched["report"]
    assert rep["world_size"] == WORLD and rep["global_batch"] == 8 and rep["steps"] == 4
    assert rep["replicas_identical"] is True
    assert Path(rep["adapter_dir"], "adapter_model.safetensors").is_file()
    assert "data parallel: 2 processes, global batch 8 rows; LoRA weights identical on every rank" in rep["summary"]
    assert rep["metrics_in_result"] >= 6
    assert rep["training_stack_in_kernel"] == []  # the kernel can launch again
    assert rep["same_dashboard"]


def test_rank_0_metrics_reach_the_notebook_live(launched):
    recs = launched["report"]["records"]
    events = [r["event"] for r in recs]
    assert events[0] == "start" and events.count("train") == 4 and "distributed" in events
    assert recs[0]["world_size"] == WORLD and recs[0]["global_batch"] == 8
    # the first train record arrived while the ranks were still running: the feed is tailed live, not
    # read at the end (launch_child.py holds rank 0 at step 1 until this side has seen that record;
    # how many of the later ones arrive before the ranks exit depends on the tailer's poll)
    train = [r for r in recs if r["event"] == "train"]
    assert train[0]["alive"] and [r["step"] for r in train] == [1, 2, 3, 4]
    header = launched["report"]["header"]
    assert header.startswith("step 4/4 (100%)") and "data parallel x2" in header


def test_interrupting_the_notebook_stops_every_rank_with_a_checkpoint(launched):
    """The interrupt comes on step 1's record; rank 0 is held at step 1 until the kernel's stop file
    is there (launch_child.py), turns it into its own SIGINT with its next record (step 2's) and
    the ranks agree on the stop at the end of step 3 (they settle it at logging steps)."""
    stopped = launched["report"]["interrupted"]
    assert stopped["interrupted"] is True and stopped["steps"] == 3 and stopped["max_steps"] == 40
    ckpt = Path(stopped["checkpoint"])
    assert ckpt.name == f"checkpoint-{stopped['steps']}" and (ckpt / MARKER).is_file()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    assert "every rank stops after the current step" in launched["stderr"]
