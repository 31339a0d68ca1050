"""Interrupts and crashes never cost trained work (issue 8): a KeyboardInterrupt in the middle of a
step, or a crash while a checkpoint is being written, leaves the last complete checkpoint as it
was; a checkpoint is written under a temporary name and renamed into place; ``resume`` continues
onto the loss curve of an uninterrupted run with the same seed.

(The SIGINT path, the notebook's stop button and the three doors' resume are in
tests/finetune/test_doors_and_resume.py.)
"""
import json
from pathlib import Path

import pytest

import nbtune
from nbtune.train.checkpoint import MARKER, checkpoints_dir, complete_checkpoints, latest_checkpoint

from .conftest import RaiseInForward, snapshot, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def train_losses(records) -> dict:
    return {r["step"]: r["loss"] for r in records if r.get("event") == "train" and r.get("loss") is not None}


def test_keyboard_interrupt_mid_step_keeps_the_checkpoints_and_resume_matches(tiny_model_dir, tiny_data, tmp_path):
    cfg = lambda name: tiny_config(tiny_model_dir, tiny_data, tmp_path / name, max_steps=5,  # noqa: E731
                                   save_steps=2, grad_accum=2)
    straight = nbtune.finetune(cfg("straight"), dashboard=False, progress=False, reuse_model=False)

    out = tmp_path / "cut"
    model, tok = nbtune.load_model(str(tiny_model_dir), max_seq_length=64)
    hook = model.model.layers[0].register_forward_hook(RaiseInForward(2 * 3 + 2, KeyboardInterrupt))  # 2nd micro-batch of step 4
    seen = {}

    def keep_checkpoint_2(rec):
        if rec.get("event") == "train" and rec.get("step") == 3:
            seen["checkpoint-2"] = snapshot(out / "checkpoints" / "checkpoint-2")

    part = nbtune.finetune(cfg("cut"), model=model, tokenizer=tok, listeners=[keep_checkpoint_2], dashboard=False,
                           progress=False)
    hook.remove()
    assert part.interrupted and part.steps == 3 and part.checkpoint.name == "checkpoint-3"
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert snapshot(out / "checkpoints" / "checkpoint-2") == seen["checkpoint-2"]  # untouched
    marker = json.loads((part.checkpoint / MARKER).read_text())
    assert marker["step"] == 3 and marker["reason"] == "keyboard_interrupt"
    assert not [p for p in checkpoints_dir(out).iterdir() if p.name.startswith(".")]  # no staging left

    resumed = nbtune.finetune(cfg("cut"), resume=True, dashboard=False, progress=False, reuse_model=False)
    assert resumed.resumed_from == 3 and resumed.steps == 5
    assert list(train_losses(resumed.metrics)) == [1, 2, 3, 4, 5]
    assert train_losses(resumed.metrics) == pytest.approx(train_losses(straight.metrics), rel=1e-5)


def test_a_crash_during_save_keeps_the_last_checkpoint(world, monkeypatch):
    """A real run saving every step; the second checkpoint save dies halfway (disk full). The first
    checkpoint stays complete and loadable, no half-written folder is left, and a re-run works."""
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = world.root / "fresh"
    real_save = transformers.Trainer._save_checkpoint
    saves = []

    def crashing_save(self, model, trial):
        saves.append(self.state.global_step)
        if len(saves) == 1:
            return real_save(self, model, trial)
        half = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        half.mkdir(parents=True)
        (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # half-written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", crashing_save)
    cfg = world.config(output={"dir": str(out)}, train={"max_steps": 3, "save_steps": 1})
    with pytest.raises(OSError, match="No space left"):
        nbtune.finetune(cfg, dashboard=False, progress=False, reuse_model=False)
    assert saves == [1, 2]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert sorted(p.name for p in checkpoints_dir(out).iterdir()) == ["checkpoint-1"]  # no staging left
    ckpt = latest_checkpoint(out)
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 1
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model_dir), ckpt)  # loadable
    assert snapshot(world.out) == {k[len("out/"):]: v for k, v in world.before.items() if k.startswith("out/")}

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", real_save)
    resumed = nbtune.finetune(cfg, resume=True, dashboard=False, progress=False, reuse_model=False)
    assert resumed.resumed_from == 1 and resumed.steps == 3


def test_saving_the_same_step_again_replaces_it_whole(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """An interrupt right after a scheduled save writes that step again: the old copy is moved
    aside, the new one renamed into place; a crash in between leaves the earlier complete
    checkpoint, and the next save cleans up and lands."""
    import os

    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from nbtune.models import add_lora
    from nbtune.train import checkpoint as ckpt_module

    out = tmp_path / "again"
    result = nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, out, max_steps=2, save_steps=1),
                             dashboard=False, progress=False, reuse_model=False)
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]

    class Saver(ckpt_module.StagedCheckpoints, Trainer):
        """A plain Trainer with nbtune's staged checkpoints: saves step 2 once more."""

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8, gradient_checkpointing="off")
    trainer = Saver(model=model, args=TrainingArguments(output_dir=str(checkpoints_dir(out)), report_to="none",
                                                        use_cpu=True, save_only_model=True))
    trainer.state.global_step = result.steps
    real_replace = os.replace
    calls = []

    def replace_then_crash(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)
        if len(calls) == 1:  # the old checkpoint-2 is moved aside; the kernel dies before the new one lands
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(ckpt_module.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="Input/output error"):
        trainer._save_checkpoint(model, trial=None)
    monkeypatch.setattr(ckpt_module.os, "replace", real_replace)
    assert calls == [("checkpoint-2", f".replaced-checkpoint-2-{os.getpid()}")]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]  # a complete one to resume from
    trainer._save_checkpoint(model, trial=None)
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not [p for p in checkpoints_dir(out).iterdir() if p.name.startswith(".")]
