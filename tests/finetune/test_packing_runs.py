"""data.packing in real runs: packed micro-batches train exactly the tokens the unpacked run trains,
responses-only labels included, and every document attends only to itself.

The batches are taken where the model receives them: nbtune's trainer hands every collated batch
to ``host_plan.plan_batch`` (the attention plan built on the host) just before the forward; the
test records them there over one epoch of each run (two real runs on the tiny Llama), and over one
epoch of the train dataloader of the trainer built for the embedded SmolLM2-135M-Instruct.
"""
import json
from collections import Counter

import pytest
import torch

import nbtune
from nbtune.assets import dataset_split_path
from nbtune.models.patches.attention import PLAN_KEY
from nbtune.train import host_plan
from nbtune.train.data import IGNORE_INDEX

pytestmark = pytest.mark.filterwarnings("ignore")

ROWS = 12
MAX_LEN = 512


def _config(model, out, packing) -> dict:
    return {
        "model": {"name": str(model), "max_seq_length": MAX_LEN},
        "data": {"source": "gsm8k", "max_rows": ROWS, "eval_split": None, "responses_only": True,
                 "packing": packing},
        "lora": {"r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 2, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 0,
                  "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 1},
        "output": {"dir": str(out)},
    }


def _documents(batch) -> list[tuple[tuple, tuple]]:
    """(input ids, labels) of each document of a collated batch: the rows of a padded batch (its
    attention mask), the pieces of a packed one (its cu_seq_lens), whose positions must restart
    at 0 at each document and whose first label must be -100."""
    ids, labels = batch["input_ids"], batch["labels"]
    if "attention_mask" in batch:
        mask = batch["attention_mask"].bool()
        return [(tuple(ids[r][mask[r]].tolist()), tuple(labels[r][mask[r]].tolist())) for r in range(ids.shape[0])]
    assert ids.shape[0] == 1 and ids.shape[1] <= 2 * MAX_LEN  # one row, at most batch_size x max_seq_length
    cu = batch["cu_seq_lens_q"].tolist()
    assert cu[0] == 0 and cu[-1] == ids.shape[1]
    plan = batch[PLAN_KEY]
    assert [(s, e) for s, e, _ in plan.pieces[0]] == list(zip(cu[:-1], cu[1:]))  # attention cut at each document
    docs = []
    for s, e in zip(cu[:-1], cu[1:]):
        assert batch["position_ids"][0, s:e].tolist() == list(range(e - s))
        assert labels[0, s] == IGNORE_INDEX  # never a target of the document before it
        docs.append((tuple(ids[0, s:e].tolist()), tuple(labels[0, s:e].tolist())))
    return docs


def _run(model, out, packing, monkeypatch):
    """The documents of every micro-batch one epoch of the run trained on, and the result."""
    batches = []
    original = host_plan.plan_batch

    def record(batch):
        batch = original(batch)
        batches.append(batch)
        return batch

    monkeypatch.setattr(host_plan, "plan_batch", record)
    result = nbtune.finetune(_config(model, out, packing), dashboard=False, progress=False)
    monkeypatch.setattr(host_plan, "plan_batch", original)
    return [d for b in batches for d in _documents(b)], batches, result


def _trained(docs) -> Counter:
    """The multiset of (document tokens, its targets): a label at position 0 is never a target."""
    return Counter((ids, labels[1:]) for ids, labels in docs)


def _check_documents(plain_docs, packed_docs, tokenizer):
    """The packed epoch trains exactly the unpacked epoch's tokens, and only the answers."""
    assert len(plain_docs) == len(packed_docs) == ROWS
    assert _trained(packed_docs) == _trained(plain_docs)
    pairs = Counter((ids[i], lab[i]) for ids, lab in packed_docs for i in range(1, len(ids)) if lab[i] != IGNORE_INDEX)
    assert pairs == Counter((ids[i], lab[i]) for ids, lab in plain_docs for i in range(1, len(ids))
                            if lab[i] != IGNORE_INDEX)
    # responses only: the targets are each answer and its end-of-turn token, nothing of the prompt
    lines = dataset_split_path("gsm8k", "train").read_text().splitlines()[:ROWS]
    answers = {json.loads(line)["answer"] for line in lines}
    for ids, labels in packed_docs:
        trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        if len(ids) < MAX_LEN:
            assert trained.removesuffix("<|im_end|>") in answers, trained
        first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
        assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")  # the prompt: -100 throughout


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_packed_run_trains_the_tokens_of_the_unpacked_run(tiny_model_dir, tmp_path, monkeypatch, tokenizer):
    """Two real runs of one epoch on the tiny Llama (SmolLM2's tokenizer and chat template)."""
    plain_docs, plain_batches, plain = _run(tiny_model_dir, tmp_path / "plain", False, monkeypatch)
    packed_docs, packed_batches, packed = _run(tiny_model_dir, tmp_path / "packed", True, monkeypatch)
    _check_documents(plain_docs, packed_docs, tokenizer)
    assert len(packed_batches) < len(plain_batches)  # fuller micro-batches: fewer of them
    assert packed.steps == len(packed_batches) and plain.steps == len(plain_batches)
    assert packed.packing["documents"] == ROWS and packed.packing["micro_batches"] == len(packed_batches)
    assert "packing: 12 documents in" in packed.summary() and plain.packing is None
    assert packed.train_loss is not None and torch.isfinite(torch.tensor(packed.train_loss))


def test_split_packed_run_fills_micro_batches_with_pieces_of_the_documents(tiny_model_dir, tmp_path, monkeypatch):
    """data.packing: split in a real run: every micro-batch but one holds batch_size x max_seq_length
    tokens, each piece attends only to itself (checked in _documents), and the run trains the
    unpacked run's targets less at most one per cut (a piece's first token is no target)."""
    plain_docs, _, _ = _run(tiny_model_dir, tmp_path / "plain", False, monkeypatch)
    pieces, batches, split = _run(tiny_model_dir, tmp_path / "split", "split", monkeypatch)
    sizes = sorted(b["input_ids"].shape[1] for b in batches)
    assert sizes[1:] == [2 * MAX_LEN] * (len(sizes) - 1)
    assert sum(len(ids) for ids, _ in pieces) == sum(len(ids) for ids, _ in plain_docs)
    cuts = split.packing["split_documents"]
    assert split.packing["strategy"] == "split" and cuts == len(pieces) - ROWS > 0
    assert "documents cut across micro-batches" in split.summary()

    def targets(docs):
        return sum(1 for _, labels in docs for t in labels[1:] if t != IGNORE_INDEX)

    assert targets(plain_docs) - cuts <= targets(pieces) <= targets(plain_docs)


def _epoch_of_trainer(model, tokenizer, out, packing):
    """The documents of one epoch of the train dataloader of the trainer a run builds."""
    from nbtune.train.config import build_config
    from nbtune.train.data import apply_chat_template_choice
    from nbtune.train.run import build_trainer, prepare_run_data

    cfg = build_config(_config("smollm2-135m-instruct", out, packing))
    apply_chat_template_choice(tokenizer, cfg.data.chat_template)
    data = prepare_run_data(cfg, tokenizer)
    trainer = build_trainer(cfg, out, model, tokenizer, data)
    return [d for batch in trainer.get_train_dataloader() for d in _documents(batch)]


def test_embedded_model_trainer_feeds_packed_batches_of_the_same_tokens(tmp_path, tokenizer):
    """On the embedded SmolLM2-135M-Instruct (loaded, LoRA added, its trainer built as a run builds
    it): one epoch of the packed trainer's batches holds the unpacked trainer's documents and
    targets. (Training it for an epoch on a CPU takes minutes; the tiny run above trains.)"""
    model, tok = nbtune.load_model("smollm2-135m-instruct", max_seq_length=MAX_LEN)
    model = nbtune.add_lora(model, r=4, alpha=8, gradient_checkpointing="off")
    plain = _epoch_of_trainer(model, tok, tmp_path / "plain", False)
    packed = _epoch_of_trainer(model, tok, tmp_path / "packed", True)
    _check_documents(plain, packed, tokenizer)


def test_dry_run_counts_packed_micro_batches(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path / "dry", True)
    report = nbtune.finetune(cfg, dry_run=True)
    stats = report.packing
    assert stats.documents == report.train_rows == ROWS and stats.tokens == report.train_tokens
    per_step = cfg["train"]["grad_accum"]  # packed: one entry per micro-batch
    assert report.steps == -(-stats.micro_batches // per_step)  # one epoch
    assert report.epochs == pytest.approx(report.steps * per_step / stats.micro_batches)
    assert stats.line() in report.summary()
    plain = nbtune.finetune(_config(tiny_model_dir, tmp_path / "dry", False), dry_run=True)
    assert plain.packing is None and plain.steps == ROWS // 2
