"""nbtune.train.token_count: tokens seen, counted on the device and read when the Trainer logs.

A real 4-step run (tiny Llama, batch 1 x grad_accum 2, rows of different lengths): the tokens in
every metrics record equal those of the same run counted the way transformers does it (a gather and
.item() after every micro-batch), while the counting gathers once per logging step, not per
micro-batch.
"""
import accelerate
import pytest
import torch

import nbtune
from nbtune.train import token_count
from nbtune.train.token_count import TokensSeenOnDevice, count_input_tokens

from .conftest import tiny_config


def test_count_follows_transformers_rules():
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    mask = (ids != 0).long()
    assert int(count_input_tokens({"input_ids": ids, "attention_mask": mask}, "non_padding", "input_ids", 0)) == 3
    assert int(count_input_tokens({"input_ids": ids}, "non_padding", "input_ids", 0)) == 3
    assert count_input_tokens({"input_ids": ids}, "non_padding", "input_ids", None) == 8
    assert count_input_tokens({"input_ids": ids, "attention_mask": mask}, "all", "input_ids", 0) == 8
    assert count_input_tokens({"labels": ids}, "all", "input_ids", 0) is None


def _run(tiny_model_dir, tiny_data, out, monkeypatch, transformers_counting: bool):
    gathers = []
    original = accelerate.Accelerator.gather

    def counting_gather(self, tensor):
        gathers.append(tuple(tensor.shape))
        return original(self, tensor)

    monkeypatch.setattr(accelerate.Accelerator, "gather", counting_gather)
    if transformers_counting:
        from transformers import Trainer

        monkeypatch.setattr(TokensSeenOnDevice, "_track_num_input_tokens", Trainer._track_num_input_tokens)
        monkeypatch.setattr(TokensSeenOnDevice, "fold_tokens_seen", lambda self: None)
    result = nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, out, logging_steps=2), dashboard=False,
                             progress=False)
    monkeypatch.undo()
    tokens = [(r["step"], r["tokens"]) for r in result.metrics if r.get("event") == "train"]
    return tokens, gathers


def test_same_tokens_as_transformers_with_one_gather_per_log(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    ours, our_gathers = _run(tiny_model_dir, tiny_data, tmp_path / "ours", monkeypatch, False)
    theirs, their_gathers = _run(tiny_model_dir, tiny_data, tmp_path / "theirs", monkeypatch, True)
    assert ours == theirs and len(ours) == 2 and ours[-1][1] > ours[0][1] > 0
    scalar_gathers = lambda gathers: sum(1 for shape in gathers if shape == ())  # noqa: E731 - token counts
    assert scalar_gathers(their_gathers) == 8  # 4 steps x 2 micro-batches
    assert scalar_gathers(our_gathers) <= 3  # the two logging steps (+ the end-of-training summary)


@pytest.mark.parametrize("mode", ["no", False])
def test_counting_off_counts_nothing(mode):
    class Args:
        include_num_input_tokens_seen = mode

    class Probe(TokensSeenOnDevice):
        args = Args()

    probe = Probe()
    probe._track_num_input_tokens({"input_ids": torch.ones(2, 3)})
    assert probe._nbtune_pending_tokens is None
    assert token_count.TokensSeenOnDevice._nbtune_pending_tokens is None
