"""Multimodal Gemma 3 decides "text only" from the collator's host tensors (host_facts.py): the
patched backbone takes the verdict instead of reading token_type_ids (and, for an image token
outside the text vocabulary, the ids) back from the GPU, one synchronization per read and
micro-batch, and the loss is the same either way."""
from __future__ import annotations

import pytest
import torch
from tiny_models import LOSS_RTOL, lora_pair, random_batch, reference_inputs, rel

from nbtune.models.patches import common
from nbtune.models.patches.gemma3 import text_only_check
from nbtune.models.patches.host_facts import TEXT_ONLY_KEY, TextOnlyCheck
from nbtune.train.host_plan import HostPlannedCollator

IMAGE = 127  # tiny_models' Gemma 3 image token, inside its 128-token text vocabulary


@pytest.fixture(scope="module")
def gemma3_pair():
    return lora_pair("gemma3")


def test_the_check_on_host_tensors():
    ids, _ = random_batch()
    with_image = ids.clone()
    with_image[1, 5] = 200
    out_of_vocab, in_vocab = TextOnlyCheck(200), TextOnlyCheck(None)
    assert out_of_vocab({"input_ids": ids}) is True
    assert out_of_vocab({"input_ids": with_image}) is False
    assert in_vocab({"input_ids": with_image}) is True  # embedded like any token: still the text path
    types = torch.zeros_like(ids)
    assert in_vocab({"input_ids": ids, "token_type_ids": types}) is True
    types[0, 2] = 1
    assert in_vocab({"input_ids": ids, "token_type_ids": types}) is False
    assert in_vocab({"input_ids": ids, "pixel_values": torch.zeros(1, 3, 28, 28)}) is False
    assert in_vocab({"input_ids": ids.to("meta")}) is None  # not on the host: the forward decides


def test_the_check_follows_the_patched_backbone(gemma3_pair):
    ours, ref = gemma3_pair
    assert text_only_check(ours) == TextOnlyCheck(None)  # 127 < 128: in the vocabulary
    assert text_only_check(ref) is None  # not patched
    assert text_only_check(lora_pair("llama")[0]) is None
    backbone = next(m for m in ours.modules() if type(m).__name__ == "Gemma3Model")
    backbone.config.image_token_id = 130
    try:
        assert text_only_check(ours) == TextOnlyCheck(130)
    finally:
        backbone.config.image_token_id = IMAGE


def _reads_of(monkeypatch, call):
    """Shapes of the tensors whose .any() ``call`` reads back (on a GPU: one sync each)."""
    read_back = []
    any_of_tensor = torch.Tensor.any

    def spying_any(self, *args, **kwargs):
        read_back.append(tuple(self.shape))
        return any_of_tensor(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "any", spying_any)
    try:
        result = call()
    finally:
        monkeypatch.undo()
    return result, read_back


def test_collator_adds_the_verdict_and_the_forward_reads_nothing_back(gemma3_pair, monkeypatch):
    ours, ref = gemma3_pair
    ids, labels = random_batch()
    collator = HostPlannedCollator(lambda rows: {"input_ids": ids, "labels": labels,
                                                 "token_type_ids": torch.zeros_like(ids)}, text_only_check(ours))
    batch = collator([])
    assert batch[TEXT_ONLY_KEY] is True
    with torch.no_grad():
        expected = ref(input_ids=ids, labels=labels, **reference_inputs(ref, ids)).loss
        loss, read_back = _reads_of(monkeypatch, lambda: ours(**batch).loss)
        assert rel(loss, expected) < LOSS_RTOL
        assert read_back == []
        # without the verdict the backbone reads token_type_ids back (the synchronization it avoids)
        _, read_back = _reads_of(monkeypatch, lambda: ours(input_ids=ids, labels=labels,
                                                           token_type_ids=torch.zeros_like(ids)))
        assert read_back == [tuple(ids.shape)]


def test_a_verdict_of_not_text_only_takes_transformers_forward(gemma3_pair, monkeypatch):
    ours, ref = gemma3_pair
    ids, labels = random_batch()
    originals = []
    original = common._original
    monkeypatch.setattr(common, "_original", lambda self, *a, **k: originals.append(type(self).__name__)
                        or original(self, *a, **k))
    with torch.no_grad():
        # transformers' forward: what it asks of a text batch besides the ids, as the reference gets it
        loss = ours(input_ids=ids, labels=labels, **reference_inputs(ours, ids), **{TEXT_ONLY_KEY: False}).loss
        assert rel(loss, ref(input_ids=ids, labels=labels, **reference_inputs(ref, ids)).loss) < LOSS_RTOL
    assert "Gemma3Model" in originals  # the backbone's own (multimodal) forward, without the nbtune keys
