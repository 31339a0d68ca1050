"""A packed micro-batch, collated by the trainer nbtune builds for ``data.packing``, has the loss
and the LoRA gradients of its documents run apart: position ids restart and ``cu_seq_lens`` cut
attention at every document, so none attends to another (on the tiny Llama, nbtune's patched
forward; the documents apart also through transformers' own model)."""
import pytest
import torch

import nbtune
from nbtune.models.patches import is_patched
from nbtune.models.patches.attention import PLAN_KEY
from nbtune.train.config import build_config
from nbtune.train.data import IGNORE_INDEX
from nbtune.train.run import build_trainer, prepare_run_data

pytestmark = pytest.mark.filterwarnings("ignore")


def _lora_model(model_dir, patch: bool):
    model, tokenizer = nbtune.load_model(str(model_dir), max_seq_length=512, dtype="float32", patch=patch)
    model = nbtune.add_lora(model, r=4, alpha=8, gradient_checkpointing="off", seed=1)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B = 0 at init: give the adapters weight, the same on both models
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model, tokenizer


def _lora_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_packed_batch_loss_and_grads_equal_documents_apart(tiny_model_dir, tmp_path):
    cfg = build_config({
        "model": {"name": str(tiny_model_dir), "max_seq_length": 256},
        "data": {"source": "gsm8k", "max_rows": 12, "eval_split": None, "packing": True},
        "train": {"batch_size": 3, "grad_accum": 1, "optimizer": "adamw", "gradient_checkpointing": "off"},
        "output": {"dir": str(tmp_path / "out")},
    })
    model, tokenizer = _lora_model(tiny_model_dir, patch=True)
    assert is_patched(model)
    data = prepare_run_data(cfg, tokenizer)
    trainer = build_trainer(cfg, tmp_path / "out", model, tokenizer, data)
    entry = max(data.train, key=lambda e: len(e["seq_lengths"]))
    assert len(entry["seq_lengths"]) >= 3
    batch = trainer.data_collator([entry])
    assert PLAN_KEY in batch and "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = [0, *torch.tensor(entry["seq_lengths"]).cumsum(0).tolist()]
    assert batch["cu_seq_lens_q"].tolist() == starts
    assert batch["position_ids"][0].tolist() == [i for n in entry["seq_lengths"] for i in range(n)]

    model.train()
    packed = model(**batch).loss
    packed.backward()
    packed_grads = _lora_grads(model)
    model.zero_grad()

    # the documents apart, each in its own batch of one; the packed loss is the mean over all targets
    docs = [(entry["input_ids"][s:e], entry["labels"][s:e]) for s, e in zip(starts, starts[1:])]
    targets = [sum(t != IGNORE_INDEX for t in labels[1:]) for _, labels in docs]
    reference, _ = _lora_model(tiny_model_dir, patch=False)
    assert not is_patched(reference)
    reference.train()
    for m in (model, reference):
        total = sum(m(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss * n
                    for (ids, labels), n in zip(docs, targets)) / sum(targets)
        torch.testing.assert_close(packed, total, rtol=1e-5, atol=1e-6)
        total.backward()
        grads = _lora_grads(m)
        assert grads.keys() == packed_grads.keys()
        for name in grads:
            torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
        m.zero_grad()

    # the check can fail: the same row with positions running on (one long document) has another loss,
    # far outside the tolerance above (a random model's losses are all near log(vocab): compare absolutely)
    leaked = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", PLAN_KEY):
        leaked.pop(key, None)
    with torch.no_grad():
        assert (model(**leaked).loss - packed.detach()).abs() > 1e-3


def test_held_out_loss_is_the_same_with_packing(tiny_model_dir, tmp_path):
    """The held-out rows are never packed: a packed run's held-out loss is the unpacked run's."""
    model, tokenizer = _lora_model(tiny_model_dir, patch=True)
    losses = []
    for packing in (False, True):
        cfg = build_config({
            "model": {"name": str(tiny_model_dir), "max_seq_length": 256},
            "data": {"source": "gsm8k", "max_rows": 8, "eval_rows": 5, "packing": packing},
            "train": {"batch_size": 2, "grad_accum": 1, "optimizer": "adamw", "gradient_checkpointing": "off"},
            "output": {"dir": str(tmp_path / str(packing))},
        })
        data = prepare_run_data(cfg, tokenizer)
        assert data.eval.num_rows == 5 and "seq_lengths" not in data.eval.column_names
        losses.append(build_trainer(cfg, tmp_path / str(packing), model, tokenizer, data).evaluate()["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
