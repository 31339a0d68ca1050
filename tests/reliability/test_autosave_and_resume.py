"""A disconnect, a damaged file or a changed setting never costs the work or bends the run: a
checkpoint every ``train.save_minutes`` and at the end, a manifest that a resume checks (falling
back to the newest sound checkpoint), the saved run.yaml as the truth on resume, only nbtune's own
files deleted, and a collapsed run that fails instead of ending as a success."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import nbtune
from nbtune.train import ConfigError
from nbtune.train.checkpoint import MARKER, checkpoint_problem, complete_checkpoints
from nbtune.train.stability import TrainingCollapsedError

from .conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")
RUN = dict(dashboard=False, progress=False, reuse_model=False)


def reasons(out: Path) -> dict:
    return {p.name: json.loads((p / MARKER).read_text())["reason"] for p in complete_checkpoints(out)}


def test_a_checkpoint_every_few_minutes_and_at_the_end(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "often"
    nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, out, max_steps=3, save_minutes=1e-9), **RUN)
    assert reasons(out) == {"checkpoint-2": "autosave", "checkpoint-3": "end"}  # keep_checkpoints: 2
    out = tmp_path / "end-only"
    nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, out, max_steps=2, save_minutes=None), **RUN)
    assert reasons(out) == {"checkpoint-2": "end"}
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-2") is None


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_model_dir, tiny_data, tmp_path, capfd):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=3, save_minutes=1e-9)
    cfg["output"]["keep_checkpoints"] = 3
    nbtune.finetune(cfg, **RUN)
    ckpt = out / "checkpoints"
    optimizer = ckpt / "checkpoint-3" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # a save cut short
    weights = ckpt / "checkpoint-2" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(raw))
    cfg["train"]["max_steps"] = 4
    with pytest.raises(ConfigError, match="checkpoint-3.*cannot be resumed from: optimizer.pt"):
        nbtune.finetune(cfg, resume=str(ckpt / "checkpoint-3"), **RUN)
    capfd.readouterr()
    resumed = nbtune.finetune(cfg, resume=True, **RUN)
    err = capfd.readouterr().err
    assert "checkpoint-3 cannot be resumed from: optimizer.pt has" in err and "truncated" in err
    assert "checkpoint-2 cannot be resumed from: adapter_model.safetensors is not what was written" in err
    assert resumed.resumed_from == 1 and resumed.steps == 4


def test_resume_keeps_the_saved_run_and_states_what_may_change(tiny_model_dir, tiny_data, tmp_path, capfd):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=2)
    nbtune.finetune(cfg, **RUN)
    saved = (out / "run.yaml").read_text()
    changed = {**cfg, "train": {**cfg["train"], "lr": 5e-2, "max_steps": 3}}
    with pytest.raises(ConfigError, match=r"train.lr 0.01 -> 0.05.*set those back"):
        nbtune.finetune(changed, resume=True, **RUN)
    assert (out / "run.yaml").read_text() == saved  # a refused resume rewrites nothing
    with pytest.raises(ConfigError, match=r"is finished \(checkpoint-2, train.max_steps 2\)"):
        nbtune.finetune(cfg, resume=True, **RUN)
    longer = {**cfg, "train": {**cfg["train"], "max_steps": 3}}
    capfd.readouterr()
    result = nbtune.finetune(longer, resume=True, **RUN)
    assert "resuming with train.max_steps 2 -> 3" in capfd.readouterr().err
    assert result.resumed_from == 2 and result.steps == 3
    assert yaml.safe_load((out / "run.yaml").read_text())["train"]["max_steps"] == 3


def test_a_fresh_run_deletes_only_nbtunes_checkpoints(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=2)
    nbtune.finetune(cfg, **RUN)
    mine = out / "checkpoints" / "notes.txt"
    mine.write_text("the user's own file\n")
    other = out / "checkpoints" / "checkpoint-7"  # looks like one, but nbtune did not write it
    other.mkdir()
    (other / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match=r"holds a previous run \(run.yaml, metrics.jsonl, adapter, checkpoint-2\)"):
        nbtune.finetune(cfg, **RUN)
    first = (out / "metrics.jsonl").read_text()
    cfg["output"]["overwrite"] = True
    nbtune.finetune(cfg, **RUN)
    assert mine.read_text() == "the user's own file\n" and (other / "weights.bin").is_file()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "metrics.jsonl").read_text() != first


def test_a_run_never_replaces_the_users_own_run_yaml(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("my: own notes\n")
    cfg = tiny_config(tiny_model_dir, tiny_data, ".", max_steps=1)
    with pytest.raises(ConfigError, match="holds run.yaml that nbtune did not write"):
        nbtune.finetune(cfg, **RUN)
    assert (tmp_path / "run.yaml").read_text() == "my: own notes\n"


def test_two_writers_to_one_folder_are_refused(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from nbtune.train import run_folder; "
                               f"run_folder.lock({str(out)!r}); print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"another nbtune run \(process {holder.pid}\) is writing to"):
            nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, out, max_steps=1), **RUN)
    finally:
        holder.communicate("")
    nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, out, max_steps=1), **RUN)  # its lock died with it
    nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, out, max_steps=2), resume=True, **RUN)  # and ours too


def test_a_collapsed_run_fails_instead_of_saving(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=6, lr=1e6)
    with pytest.raises(TrainingCollapsedError, match=r"(not finite|ln\(vocabulary size\)).*train.lr"):
        nbtune.finetune(cfg, **RUN)
    assert not (out / "adapter").exists()


def test_a_real_sigkill_loses_at_most_the_autosave_interval(tiny_model_dir, tiny_data, tmp_path):
    """``nbtune finetune`` killed with SIGKILL once its second autosave is on disk; ``--resume``
    continues from the newest sound checkpoint and finishes the run."""
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=40, save_minutes=1e-9)
    cfg["output"]["keep_checkpoints"] = 50
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "nbtune", "finetune", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a ceiling only: the kill waits on the files, not the clock
        while len(complete_checkpoints(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = max(int(p.name.split("-")[1]) for p in complete_checkpoints(out))
    assert 2 <= saved < 40
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps if r.get("event") == "train") == 40
    assert not list((out / "checkpoints").glob(".staging-*"))
