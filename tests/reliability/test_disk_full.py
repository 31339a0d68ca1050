"""A full disk during a real run (issue 8): the output folder sits on a small tmpfs that a
listener fills up mid-run. The error says the disk is full (ENOSPC), which file was being written
in which folder, how much room the run needs, and which complete checkpoint is kept (and it is
intact and resumable). Needs root to mount the tmpfs; skipped with the reason otherwise."""
import gc
import os
import subprocess

import pytest

import nbtune
from nbtune.train.checkpoint import complete_checkpoints
from nbtune.train.disk import DiskFullError

from .conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted at tmp_path/disk, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield mount
    gc.collect()  # a failed write's file object, held by a traceback, keeps the mount busy
    if os.path.ismount(mount) and subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # detached now, freed once nothing holds it


def fill(disk) -> None:
    """Write a filler file at the disk's root until the disk is full."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("when", ["checkpoint", "adapter"])
def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(small_disk, offline_model_dir, tiny_data, when):
    out = small_disk / "run"
    cfg = tiny_config(offline_model_dir, tiny_data, out, max_steps=4, save_steps=1)
    cfg["output"]["keep_checkpoints"] = 2

    def filler(rec):  # the disk fills up: after step 3 is logged (its checkpoint next), or at the end
        if (when == "checkpoint" and rec.get("event") == "train" and rec.get("step") == 3) or \
                (when == "adapter" and rec.get("event") == "end"):
            fill(small_disk)

    with pytest.raises(DiskFullError) as info:
        nbtune.finetune(cfg, listeners=[filler], dashboard=False, progress=False, reuse_model=False)
    msg = str(info.value)
    last = "checkpoint-2" if when == "checkpoint" else "checkpoint-4"
    written = "checkpoints/.staging-" if when == "checkpoint" else "adapter/"
    for needle in ("the disk is full (ENOSPC: No space left on device)", f"writing {written}", f"in {out}:", "free on that disk",
                   "this run needs about", "a checkpoint takes",
                   f"Kept: the last complete checkpoint {out / 'checkpoints' / last}", "resume=True",
                   "free space on that disk, or set output.dir"):
        assert needle in msg, msg
    assert ("the adapter in" in msg and "is not complete" in msg) if when == "adapter" else \
        "no adapter of this run was saved" in msg
    assert "Traceback" not in msg and "\n" not in msg
    # what is kept is complete, the half-written checkpoint is gone, and the run resumes from it
    kept = complete_checkpoints(out)
    assert kept[-1].name == last and info.value.checkpoint == kept[-1]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".staging")]
    if when == "checkpoint":
        assert "(a new checkpoint, written there before it is renamed into place)" in msg
    (small_disk / "filler").unlink()
    cfg["train"]["max_steps"] = 6
    resumed = nbtune.finetune(cfg, resume=True, dashboard=False, progress=False, reuse_model=False)
    assert resumed.resumed_from == int(last.split("-")[1]) and resumed.steps == 6
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_torch_saves_own_words_for_a_full_disk_are_recognized(small_disk):
    """torch.save on a full disk raises "unexpected pos" / "file write failed", never ENOSPC: it
    still counts as a full disk (the disk has no room left), with the file it was writing; the CLI
    reports it as a run failure (exit 1, its message)."""
    import torch

    from nbtune.train.disk import is_disk_full, written_file
    from nbtune.ui.fixable import fixable_kind

    out = small_disk / "run"
    out.mkdir()
    fill(small_disk)
    with pytest.raises(Exception) as info:
        torch.save({"w": torch.zeros(256, 256)}, str(out / "optimizer.pt"))
    assert "No space left" not in str(info.value)  # torch's words, not the errno's
    assert is_disk_full(info.value, out) and written_file(info.value, out) == out / "optimizer.pt"
    assert not is_disk_full(ValueError("a bad value"), out)
    assert fixable_kind(DiskFullError("full", None, None)) == "run"  # the CLI: exit 1 with its message
    del info  # its traceback holds torch's open file on the disk
