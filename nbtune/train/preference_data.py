"""Preference rows -> token ids for DPO / ORPO: a prompt, a chosen reply and a rejected reply.

A row holds ``prompt``, ``chosen`` and ``rejected`` (other names through ``data.columns``, e.g.
``columns: {chosen: better, rejected: worse}``). Each is either

- plain text: the prompt becomes one user turn, each reply one assistant turn; or
- chat form: a list of {role, content} turns (``from`` / ``value`` too, as for SFT); a reply may
  also be a single turn (one {role, content} object). The prompt may end with a user turn (most
  often) or hold a whole conversation so far; the replies are what comes after it.

Without a ``prompt`` column, chat-form ``chosen`` and ``rejected`` that start with the same turns
(the whole conversation each, as many public preference sets store it) are split there: the
shared turns are the prompt, the rest are the replies.

Everything is rendered with the tokenizer's chat template (``data.chat_template`` as for SFT, and
``data.system_prompt`` put first when the prompt has no system turn). The reply's tokens are those
after the prompt's, rendered with the generation prompt, where the two renderings agree (TRL's rule:
a template that renders the prompt alone differently is cut where they diverge). Only the reply
tokens are scored. Pairs are dropped, and counted by reason, when a reply is empty, when chosen and
rejected are the same, or when the prompt alone fills ``max_seq_length``; a pair longer than
``max_seq_length`` is kept and cut to its first ``max_seq_length`` tokens when batched (counted as
truncated).
"""
from __future__ import annotations

from .config import DataConfig
from .data import DataError, TokenizedData, _normalize_turn, split_rows

COLUMNS = ("prompt", "chosen", "rejected")


def check_columns(columns, cfg: DataConfig, where: str) -> None:
    """A :class:`DataError` naming the columns found and the fix when the rows are not preference rows."""
    cols = set(columns)
    if "chosen" in cols and "rejected" in cols:
        return
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    raise DataError(
        f"{where}: train.method dpo / orpo reads preference rows with columns prompt, chosen and rejected; these rows "
        f"have {sorted(columns)} (no {' or '.join(repr(m) for m in missing)}). Name your columns in data.columns "
        "(e.g. columns: {prompt: question, chosen: good_answer, rejected: bad_answer}), or train with "
        "train.method: sft on conversations.")


def _turns(value, field: str, where: str) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: column {field!r} must be text or a list of {{role, content}} turns, got "
                        f"{type(value).__name__}")
    if not value:
        raise DataError(f"{where}: column {field!r} is an empty list of turns")
    return [_normalize_turn(t, f"{where} column {field!r}", i) for i, t in enumerate(value)]


def _reply(value, field: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    turns = _turns(value, field, where)
    if turns[0]["role"] != "assistant":
        raise DataError(f"{where}: column {field!r} starts with a {turns[0]['role']!r} turn; a reply starts with the "
                        "assistant's turn (put the conversation before it in the prompt column)")
    return turns


def to_pair(row: dict, where: str, system_prompt: str | None = None):
    """One row -> (prompt turns, chosen turns, rejected turns), or a :class:`DataError` naming the row
    and the field."""
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise DataError(f"{where}: missing column {field!r} (a preference row needs prompt, chosen and rejected)")
    prompt = row.get("prompt")
    if prompt is None:  # the prompt is implicit: the turns both conversations start with
        if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
            raise DataError(f"{where}: no 'prompt' column; with text replies the prompt must be given (a prompt "
                            "column, or chosen / rejected as whole conversations that share their first turns)")
        chosen, rejected = _turns(row["chosen"], "chosen", where), _turns(row["rejected"], "rejected", where)
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        while shared and chosen[shared - 1]["role"] == "assistant":  # a reply starts at an assistant turn
            shared -= 1
        if shared == 0:
            raise DataError(f"{where}: no 'prompt' column, and chosen and rejected do not start with the same turns "
                            "(the shared turns would be the prompt); add a prompt column")
        prompt_turns, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        for field, turns in (("chosen", chosen), ("rejected", rejected)):
            if not turns or turns[0]["role"] != "assistant":
                raise DataError(f"{where}: column {field!r} has no assistant reply after the turns it shares with "
                                "the other column")
    else:
        if isinstance(prompt, str):
            prompt_turns = [{"role": "user", "content": prompt}]
        else:
            prompt_turns = _turns(prompt, "prompt", where)
        chosen, rejected = _reply(row["chosen"], "chosen", where), _reply(row["rejected"], "rejected", where)
    if prompt_turns[-1]["role"] == "assistant":
        raise DataError(f"{where}: column 'prompt' ends with an assistant turn; the replies to compare go in chosen "
                        "and rejected")
    if system_prompt and prompt_turns[0]["role"] != "system":
        prompt_turns = [{"role": "system", "content": system_prompt}, *prompt_turns]
    return prompt_turns, chosen, rejected


def check_rows(rows: list[dict], cfg: DataConfig, where: str) -> None:
    """Every row parses into a pair (the cheap check before a run loads anything)."""
    if not rows:
        raise DataError(f"{where}: no rows")
    check_columns(rows[0].keys(), cfg, where)
    for n, row in enumerate(rows, 1):
        to_pair(row, f"{where} row {n}", cfg.system_prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(prompt, chosen, rejected, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of one pair, rendered with the chat template."""
    def ids(messages, **kwargs):
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids = ids(prompt, add_generation_prompt=True)
    with_chosen, with_rejected = ids(prompt + chosen), ids(prompt + rejected)
    cut = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    return prompt_ids[:cut], with_chosen[cut:], with_rejected[cut:]


def tokenize_pairs(rows, tokenizer, cfg: DataConfig, max_len: int, where: str):
    """Rows -> a datasets.Dataset(prompt_ids, chosen_ids, rejected_ids), dropped pairs by reason, and
    the number of kept pairs longer than ``max_len`` tokens."""
    import datasets

    columns = {c: [] for c in ("prompt_ids", "chosen_ids", "rejected_ids")}
    dropped, truncated = {}, 0

    def drop(reason):
        dropped[reason] = dropped.get(reason, 0) + 1

    for n, row in enumerate(rows, 1):
        prompt, chosen, rejected = to_pair(row, f"{where} row {n}", cfg.system_prompt)
        if not any(t["content"].strip() for t in chosen) or not any(t["content"].strip() for t in rejected):
            drop("empty reply")
            continue
        if chosen == rejected:
            drop("chosen and rejected are the same")
            continue
        p, c, r = tokenize_pair(prompt, chosen, rejected, tokenizer)
        if len(p) >= max_len:
            drop(f"prompt fills max_seq_length={max_len}")
            continue
        if c == r:
            drop("chosen and rejected are the same")
            continue
        truncated += len(p) + max(len(c), len(r)) > max_len
        columns["prompt_ids"].append(p)
        columns["chosen_ids"].append(c)
        columns["rejected_ids"].append(r)
    if not columns["prompt_ids"]:
        fixes = ["raise model.max_seq_length"] if any("max_seq_length" in r for r in dropped) else []
        raise DataError(f"{where}: all {len(rows)} pairs were dropped ("
                        + ", ".join(f"{c} {r}" for r, c in dropped.items()) + "); "
                        + " or ".join(fixes + ["check the data"]))
    return datasets.Dataset.from_dict(columns), dropped, truncated


def prepare_preference_data(cfg: DataConfig, tokenizer, max_len: int) -> TokenizedData:
    """The train (and held-out) preference pairs tokenized; the held-out pairs are chosen as for
    SFT (:func:`nbtune.train.data.split_rows`: an embedded set's test split, 5% of a local file)."""
    splits = split_rows(cfg)
    check_columns(splits.train[0].keys(), cfg, splits.where)
    train, dropped, truncated = tokenize_pairs(splits.train, tokenizer, cfg, max_len, splits.where)
    held_out = None
    if splits.held_out is not None:
        held_out, _, _ = tokenize_pairs(splits.held_out, tokenizer, cfg, max_len, splits.eval_where)
    return TokenizedData(train=train, eval=held_out, dropped=dropped, format="preference", truncated=truncated,
                         eval_note=splits.eval_note)


def pair_counts(data: TokenizedData) -> dict:
    """Pairs and tokens of the train split: ``pairs``, ``tokens`` (prompt + chosen + prompt + rejected,
    what the model reads), ``scored`` (chosen + rejected reply tokens) and ``longest`` sequence."""
    ds = data.train
    p, c, r = (list(map(len, ds[col])) for col in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return dict(pairs=len(p), tokens=sum(2 * a + b + d for a, b, d in zip(p, c, r)), scored=sum(c) + sum(r),
                longest=max(a + max(b, d) for a, b, d in zip(p, c, r)))


def dry_run_report(cfg, plan, tokenizer, world: int, resume_from):
    """The dry run of a dpo / orpo config: pairs, their tokens (what the model reads: the prompt once
    with each reply) and the reply tokens scored, the steps, without loading the model."""
    from . import batch_fit, distributed
    from .run import DryRunReport

    data = prepare_preference_data(cfg.data, tokenizer, cfg.model.max_seq_length)
    counts = pair_counts(data)
    per_step = min(distributed.global_batch(cfg, world), counts["pairs"])  # pairs per optimizer step
    steps = cfg.train.max_steps or int(-(-counts["pairs"] * cfg.train.epochs // per_step))
    first = data.train[0]
    notes = [n for n in (data.eval_note, batch_fit.oversized_batch_note(cfg, counts["pairs"], world)) if n]
    notes.append(f"train.method {cfg.train.method}: each pair is read as prompt + chosen and prompt + rejected"
                 + (" (and once more with LoRA off, for the reference)" if cfg.train.method == "dpo" else ""))
    return DryRunReport(
        config=cfg, plan=plan, format=data.format, train_rows=counts["pairs"],
        eval_rows=0 if data.eval is None else data.eval.num_rows, dropped=data.dropped,
        train_tokens=counts["tokens"], trainable_tokens=counts["scored"], longest=counts["longest"], steps=steps,
        epochs=steps * per_step / counts["pairs"], resume_from=resume_from,
        sample=tokenizer.decode(first["prompt_ids"] + first["chosen_ids"]), world_size=world,
        rows_truncated=data.truncated, notes=notes, unit="pairs")
