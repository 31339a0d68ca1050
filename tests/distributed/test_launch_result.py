"""Rank 0's result crosses to the notebook as JSON: every field of LaunchResult that the kernel does
not make itself goes, comes back with its type (paths as Path), and load() hands all the fields a
FinetuneResult shares with it over, so a field added to the result dataclasses travels without a list
to update."""
import dataclasses
import json
from pathlib import Path

from nbtune.train.config import build_config
from nbtune.train.run import FinetuneResult
from nbtune.ui.launch import _KERNEL_SIDE, LaunchResult, _launch_result, _result_fields


def _rank0_result(tmp_path):
    return FinetuneResult(
        config=build_config({"model": "smollm2-135m-instruct"}), output_dir=tmp_path, adapter_dir=tmp_path / "adapter",
        log_path=tmp_path / "metrics.jsonl", eval_loss_before=2.5, eval_loss_after=1.5, train_loss=1.8, steps=7,
        seconds=12.5, metrics=[{"event": "train"}], interrupted=True, checkpoint=tmp_path / "checkpoint-7",
        resumed_from=3, merged_dir=None, world_size=2, global_batch=8, replicas_identical=True,
        gradient_checkpointing="plain", checkpointing_reason="data parallel on 2 GPUs")


def test_every_result_field_crosses_and_comes_back_typed(tmp_path):
    result = _rank0_result(tmp_path)
    sent = json.loads(json.dumps(_result_fields(result)))
    expected = {f.name for f in dataclasses.fields(LaunchResult)} - set(_KERNEL_SIDE)
    assert set(sent) == expected and "checkpointing_reason" in sent and "adapter_dir" in sent
    back = _launch_result(result.config, sent, metrics=result.metrics)
    for name in expected:
        assert getattr(back, name) == getattr(result, name), name
    assert isinstance(back.adapter_dir, Path) and isinstance(back.checkpoint, Path) and back.merged_dir is None


def test_load_hands_every_shared_field_to_a_finetune_result(tmp_path):
    result = _rank0_result(tmp_path)
    back = _launch_result(result.config, json.loads(json.dumps(_result_fields(result))), metrics=result.metrics)
    loaded = back.load()
    assert isinstance(loaded, FinetuneResult) and back.load() is loaded
    shared = {f.name for f in dataclasses.fields(FinetuneResult)} & {f.name for f in dataclasses.fields(LaunchResult)}
    for name in shared - {"_loaded"}:
        assert getattr(loaded, name) == getattr(result, name), name
    assert loaded.model is None and loaded._generation == -1  # the model lives in the finished rank processes
