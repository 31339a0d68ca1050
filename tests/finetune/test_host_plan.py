"""The attention plan is built on the host by the trainer's collator, not from GPU tensors per micro-batch.

A patched model's forward builds its ``AttentionPlan`` from the attention mask and the position ids;
on a GPU each read is a device synchronization (up to four per micro-batch: seen as 168 vs 200 syncs
in tests/finetune/test_no_sync_gpu.py). nbtune's trainer wraps TRL's collator so that every batch
carries its plan, built from the collator's host tensors, and the forward takes it.
"""
import warnings

import pytest
import torch

import nbtune
from nbtune.models.patches import common, is_patched
from nbtune.models.patches.attention import PLAN_KEY, AttentionPlan, build_plan, plan_batch
from nbtune.train import host_plan

from .conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def _padded_batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 0, 0]])  # TRL's collator: pads get position 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": ids.clone()}


def test_plan_batch_is_build_plan_of_the_host_tensors():
    batch = _padded_batch()
    planned = plan_batch(dict(batch))
    assert planned[PLAN_KEY] == build_plan(2, 6, batch["attention_mask"], batch["position_ids"])
    assert planned[PLAN_KEY].packed  # the pads' restarting positions make pieces of their own
    packed = {"input_ids": torch.ones(1, 7, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])}
    assert plan_batch(packed)[PLAN_KEY].pieces == ((((0, 3, False), (3, 5, False), (5, 7, False))),)
    left = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[0, 1, 1, 1], [1] * 4])}
    assert plan_batch(left)[PLAN_KEY] is None  # left padding: transformers' own path, decided on the host too


def test_plan_batch_leaves_batches_it_cannot_plan():
    assert PLAN_KEY not in plan_batch({"labels": torch.ones(2, 3)})  # no input_ids
    assert PLAN_KEY not in plan_batch({"input_ids": torch.ones(6, dtype=torch.long)})  # not (batch, seq)
    on_meta = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, device="meta")}
    assert PLAN_KEY not in plan_batch(on_meta)  # not on the host: reading it back is what is avoided


def test_collator_wrapper_plans_batch_encodings_and_keeps_the_collators_attributes():
    from transformers import BatchEncoding

    class Collator:
        pad_token_id = 0

        def __call__(self, features):
            return BatchEncoding(_padded_batch())

    wrapped = host_plan.HostPlannedCollator(Collator())
    batch = wrapped([{}])
    assert isinstance(batch, BatchEncoding) and batch[PLAN_KEY] == plan_batch(_padded_batch())[PLAN_KEY]
    assert wrapped.pad_token_id == 0
    assert host_plan.HostPlannedCollator(lambda f: [1, 2])([{}]) == [1, 2]  # not a mapping: as it was


@pytest.fixture
def patched_tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nbtune.add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8,
                                gradient_checkpointing="off")
    assert is_patched(model.get_base_model())
    return model


def test_forward_takes_the_plan_and_matches_planning_itself(patched_tiny, count_calls):
    batch = _padded_batch()
    torch.manual_seed(0)
    loss_self = patched_tiny(**batch).loss
    calls = count_calls(common, ["build_plan"])
    loss_given = patched_tiny(**plan_batch(dict(batch))).loss
    assert calls["build_plan"] == 0  # the forward planned nothing itself
    torch.testing.assert_close(loss_given, loss_self, rtol=0, atol=0)

    # a plan that does not describe these rows (another length) is not used: the forward plans itself
    wrong = dict(batch, **{PLAN_KEY: AttentionPlan(pieces=(((0, 4, False),),), shared=True)})
    torch.testing.assert_close(patched_tiny(**wrong).loss, loss_self, rtol=0, atol=0)
    assert calls["build_plan"] == 1


def test_plan_key_never_reaches_transformers_own_forward(patched_tiny):
    batch = plan_batch(_padded_batch())
    labels = batch.pop("labels")
    out = patched_tiny(**batch)  # no labels: the causal LM head runs transformers' forward
    assert out.logits.shape[:2] == labels.shape
    left = plan_batch({"input_ids": torch.tensor([[0, 5, 6], [5, 6, 7]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])})
    assert left[PLAN_KEY] is None
    assert torch.isfinite(patched_tiny(**left, labels=left["input_ids"]).loss)  # transformers' model forward


def test_trainer_batches_carry_the_plan_and_the_forward_never_builds_one(tiny_model_dir, tiny_data, tmp_path,
                                                                         count_calls):
    built = count_calls(common, ["build_plan"])
    host = count_calls(host_plan, ["plan_batch"])
    nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, tmp_path / "out", max_steps=2), dashboard=False,
                    progress=False)
    assert host["plan_batch"] >= 4  # 2 steps x 2 micro-batches, and the held-out batches
    assert built["build_plan"] == 0


def test_second_run_on_the_reused_model_keeps_the_fused_loss_and_host_plans(tiny_model_dir, tiny_data, tmp_path,
                                                                          count_calls):
    """The second run in one process reuses the base model (nbtune/train/session.py), whose causal LM
    forward TRL had wrapped in the first run: it must still train on the patched forward (fused loss,
    the plan from the host), as the first run did."""
    nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, tmp_path / "first", max_steps=1, warmup_steps=0),
                    dashboard=False, progress=False)
    calls = count_calls(common, ["build_plan", "fused_linear_cross_entropy", "lora_qkv", "lora_mlp", "rms_norm"])
    nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, tmp_path / "second", max_steps=2), dashboard=False,
                    progress=False)
    assert calls["fused_linear_cross_entropy"] >= 4  # 2 steps x 2 micro-batches
    assert calls["lora_qkv"] >= 8 and calls["lora_mlp"] >= 8 and calls["rms_norm"] >= 20  # 2 layers each time
    assert calls["build_plan"] == 0


def test_packed_rows_get_their_sequence_pieces_from_the_host(tiny_model_dir, tiny_data, tmp_path, count_calls,
                                                            monkeypatch):
    """data.packing: each micro-batch is one row of whole documents with restarting positions and
    cu_seq_lens (the padding-free collator): the host plan cuts it at the document starts, the
    forward uses it."""
    seen = []
    original = host_plan.plan_batch

    def record(batch):
        batch = original(batch)
        seen.append((batch[PLAN_KEY], batch.get("cu_seq_lens_q"), batch["input_ids"].shape))
        return batch

    monkeypatch.setattr(host_plan, "plan_batch", record)
    built = count_calls(common, ["build_plan"])
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "out", max_steps=2, batch_size=2)
    cfg["data"].update(packing=True, eval_split=None)
    nbtune.finetune(cfg, dashboard=False, progress=False)
    assert built["build_plan"] == 0
    assert len(seen) >= 4  # 2 steps x 2 micro-batches
    for plan, cu, shape in seen:
        assert shape[0] == 1 and shape[1] <= 2 * 64  # one row of at most batch_size x max_seq_length tokens
        assert plan.packed and len(plan.pieces) == 1
        assert [(s, e) for s, e, _single in plan.pieces[0]] == list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
    assert max(len(plan.pieces[0]) for plan, _, _ in seen) >= 2  # several documents share a micro-batch
