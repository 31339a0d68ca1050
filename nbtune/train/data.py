"""Rows in any common shape -> chat messages -> token ids with loss labels.

Sources: an embedded name (``gsm8k``), a local .json/.jsonl/.csv/.parquet file, or a hub data set id
(online only). Formats, detected from the columns unless given:

- ``messages``: a list of {role, content} turns (column ``messages`` or ``conversations``);
- ``prompt_completion``: ``prompt`` and ``completion`` strings;
- ``instruction``: ``instruction``, optional ``input``, ``output`` (Alpaca);
- ``qa``: ``question`` and ``answer``;
- ``text``: plain ``text``, trained on every token.

Every row is rendered with the tokenizer's chat template. With ``responses_only``, only the
assistant turns' tokens carry labels (the rest are -100), found from character offsets of the
rendered conversation so tokenization across turn boundaries cannot shift them. A row longer than
``max_seq_length`` tokens keeps its first ``max_seq_length`` (packed or not: see packing.py); how
many were cut is the run's ``rows_truncated``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import quiet
from ..assets import DATASETS, dataset_split_path
from .config import DataConfig

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
    "qa": ("question", "answer"),
    "text": ("text",),
}


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, the row and the field."""


@dataclasses.dataclass
class TokenizedData:
    train: object  # datasets.Dataset with input_ids, labels
    eval: object | None
    dropped: dict  # reason -> count, for the train split
    format: str
    truncated: int = 0  # train rows longer than max_seq_length, cut to their first max_seq_length tokens
    packing: object = None  # PackingStats once the train split is packed (run.prepare_run_data)
    eval_note: str | None = None  # how the held-out rows were chosen, when nbtune chose them (one line)


FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
AUTO_EVAL_FRACTION = 0.05  # eval_split "auto" on a local file: the share of its rows held out


def is_local_file(source: str) -> bool:
    """``data.source`` names a local file (not an embedded data set, not a hub id)."""
    if source in DATASETS:
        return False
    path = Path(source).expanduser()
    return path.suffix.lower() in FILE_SUFFIXES or path.exists()


def check_splits(cfg: DataConfig) -> None:
    """A local file has one split, train: a split name in ``data.split`` or ``data.eval_split`` is
    a :class:`DataError` (it would silently read the whole file again: evaluating on the
    training rows)."""
    if not is_local_file(cfg.source):
        return
    where = f"data.source {cfg.source!r} is a local file, which has one split (train)"
    if cfg.split != "train":
        raise DataError(f"data.split: {cfg.split!r} names a split, but {where}. Fix: leave data.split out (or "
                        "give train) and choose the held-out rows with data.eval_split: auto (5% of the rows), "
                        "a fraction (e.g. 0.1) or null")
    if isinstance(cfg.eval_split, str) and cfg.eval_split != "auto":
        raise DataError(f"data.eval_split: {cfg.eval_split!r} names a split, but {where}: the held-out loss would "
                        "be measured on the training rows. Fix: data.eval_split: auto (5% of the rows held out), "
                        "a fraction of the rows (e.g. 0.1), or null (no held-out loss)")


def load_rows(cfg: DataConfig, split: str) -> tuple[list[dict], str]:
    """(rows, where they came from) for one split of the configured source."""
    source = cfg.source
    if source in DATASETS:
        path = dataset_split_path(source, split)
        return read_file(path), f"{source}:{split}"
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        if path.is_dir():
            raise DataError(f"data.source: {str(path)!r} is a folder; give a .jsonl, .json, .csv or .parquet file")
        if not path.is_file():
            raise DataError(f"data.source: file {str(path)!r} does not exist")
        return read_file(path), str(path)
    return _load_hub(source, split), f"{source}:{split}"


def read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not raw.strip():
        raise DataError(f"{path} is empty")
    if suffix in (".jsonl", ".json", ".csv"):
        text = _utf8(raw, path)
    if suffix in (".jsonl", ".json"):
        if suffix == ".json" or text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of rows")
            rows = data
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: malformed JSON ({e.msg})") from None
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise DataError(f"{path} row {n}: expected an object, got {type(row).__name__}")
        return rows
    if suffix in (".csv", ".parquet"):
        import datasets

        try:
            with quiet.loading():  # no "Generating train split" bar (nbtune/quiet.py)
                ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        except Exception as e:
            raise DataError(f"cannot read {path}: {e}") from None
        return ds.to_list()
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _utf8(raw: bytes, path: Path) -> str:
    """``raw`` decoded as UTF-8, or a :class:`DataError` naming the line, the byte offset and the fix
    (a file saved as latin-1 / cp1252, as spreadsheet programs often do)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {e.start}: {e.reason}); "
            "nbtune reads data files as UTF-8. Fix: save the file as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name} (if it is latin-1 / Windows-1252), or in "
            "Python read it with its encoding (open(path, encoding='latin-1')) and write it with encoding='utf-8'"
        ) from None


def _load_hub(source: str, split: str) -> list[dict]:
    import datasets

    try:
        with quiet.loading():
            return datasets.load_dataset(source, split=split).to_list()
    except Exception as e:
        import difflib

        close = difflib.get_close_matches(source, list(DATASETS), n=1)
        raise DataError(
            f"data.source {source!r} is not an embedded name ({', '.join(DATASETS)})"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f", not a local file, and could not be loaded from the hub: {e}"
        ) from None


def detect_format(columns, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    cols = set(columns)
    if "conversations" in cols:
        cols.add("messages")
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in cols for c in needed):
            return fmt
    raise DataError(
        f"data: cannot tell the format from the columns {sorted(columns)}; expected one of "
        + "; ".join(f"{f}: {', '.join(c)}" for f, c in FORMAT_COLUMNS.items())
        + ". Set data.format and/or data.columns (e.g. columns: {prompt: my_question})."
    )


def to_messages(row: dict, fmt: str, where: str, system_prompt: str | None = None) -> list[dict] | str:
    """One row -> a list of chat messages (or the plain text for the ``text`` format)."""

    def field(name):
        if name not in row or row[name] is None:
            raise DataError(f"{where}: missing column {name!r} (the {fmt} format needs {', '.join(FORMAT_COLUMNS[fmt])})")
        value = row[name]
        if fmt != "messages" and not isinstance(value, str):
            raise DataError(f"{where}: column {name!r} must be text, got {type(value).__name__}")
        return value

    if fmt == "text":
        return field("text")
    if fmt == "messages":
        turns = row.get("messages", row.get("conversations"))
        if turns is None:
            field("messages")
        messages = [_normalize_turn(t, where, i) for i, t in enumerate(turns)]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": field("prompt")}, {"role": "assistant", "content": field("completion")}]
    elif fmt == "instruction":
        prompt = field("instruction")
        if row.get("input"):
            prompt = f"{prompt}\n\n{row['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": field("output")}]
    elif fmt == "qa":
        messages = [{"role": "user", "content": field("question")}, {"role": "assistant", "content": field("answer")}]
    else:
        raise DataError(f"data.format {fmt!r} is not one of {', '.join(FORMAT_COLUMNS)}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn to train on (roles: {[m['role'] for m in messages]})")
    return messages


def _normalize_turn(turn, where: str, i: int) -> dict:
    if not isinstance(turn, dict):
        raise DataError(f"{where}: turn {i} must be an object with role and content, got {type(turn).__name__}")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(role, role)
    if role not in ROLES:
        raise DataError(f"{where}: turn {i} has role {role!r}; allowed roles: {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: turn {i} content must be text, got {type(content).__name__}")
    return {"role": role, "content": content}


def tokenize_example(messages, tokenizer, max_len: int, responses_only: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation, truncated to max_len tokens."""
    ids, labels = tokenize_whole(messages, tokenizer, responses_only)
    return ids[:max_len], labels[:max_len]


def tokenize_whole(messages, tokenizer, responses_only: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation (or plain text), not truncated."""
    if isinstance(messages, str):
        text = messages + (tokenizer.eos_token or "")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return ids, list(ids)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not responses_only:
        labels = list(ids)
    else:
        spans = assistant_spans(messages, tokenizer, text)
        labels = [
            tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
            for tok, (start, _end) in zip(ids, offsets)
        ]
    return list(ids), labels


def assistant_spans(messages, tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` produced by the assistant turns (their content and end token)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(upto.rstrip())):
            raise DataError(
                "data.responses_only: this tokenizer's chat template does not render conversations "
                "prefix-consistently, so assistant tokens cannot be located; set data.responses_only: false"
            )
        spans.append((len(before), len(upto.rstrip())))
    return spans


def tokenize_rows(rows, tokenizer, cfg: DataConfig, max_len: int, where: str, fmt: str):
    """Rows -> a datasets.Dataset(input_ids, labels), a count of dropped rows by reason, and the
    number of kept rows cut to max_len tokens."""
    import datasets

    out_ids, out_labels, dropped, truncated = [], [], {}, 0
    for n, row in enumerate(rows, 1):
        messages = to_messages(row, fmt, f"{where} row {n}", cfg.system_prompt)
        empty = _empty_reason(messages, cfg.responses_only)
        if empty:
            dropped[empty] = dropped.get(empty, 0) + 1
            continue
        ids, labels = tokenize_whole(messages, tokenizer, cfg.responses_only)
        cut = len(ids) > max_len
        ids, labels = ids[:max_len], labels[:max_len]
        if not ids:
            dropped["empty"] = dropped.get("empty", 0) + 1
            continue
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            reason = f"no trainable tokens within max_seq_length={max_len}"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        out_ids.append(ids)
        out_labels.append(labels)
        truncated += cut
    if not out_ids:
        fixes = (["raise model.max_seq_length"] if any("max_seq_length" in r for r in dropped) else []) + [
            "check the data"]
        raise DataError(
            f"{where}: all {len(rows)} rows were dropped ("
            + ", ".join(f"{c} {r}" for r, c in dropped.items())
            + "); " + " or ".join(fixes)
        )
    return datasets.Dataset.from_dict({"input_ids": out_ids, "labels": out_labels}), dropped, truncated


def _empty_reason(messages, responses_only: bool) -> str | None:
    """Why a row has nothing to learn from before tokenizing (empty text / empty replies), or None."""
    if isinstance(messages, str):
        return None if messages.strip() else "empty text"
    if responses_only and not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        return "empty assistant reply"
    return None


@dataclasses.dataclass
class RowSplits:
    """The configured rows before tokenizing: the train rows and the held-out ones (or None)."""

    train: list[dict]
    held_out: list[dict] | None
    where: str  # where the train rows came from, for messages ("gsm8k:train", a file path)
    eval_where: str
    eval_note: str | None = None  # how the held-out rows were chosen, when nbtune chose them (one line)


def split_rows(cfg: DataConfig) -> RowSplits:
    """The train rows and the held-out rows of ``cfg`` (columns renamed by ``data.columns``).
    ``eval_split`` "auto": an embedded data set's test split; on a local file, 5% of its rows (at
    least 1) held out, said in ``eval_note``; on a hub data set, none. A fraction holds out that
    share of the train rows (a seeded shuffle); ``max_rows`` / ``eval_rows`` cut each side after."""
    check_splits(cfg)
    rows, where = load_rows(cfg, cfg.split)
    rows = [_rename(r, cfg.columns) for r in rows]
    if not rows:
        raise DataError(f"{where}: no rows")
    eval_split = cfg.eval_split
    held_out = None
    eval_note = None
    if eval_split == "auto" and is_local_file(cfg.source):
        if len(rows) >= 2:
            eval_split = AUTO_EVAL_FRACTION
            n = max(1, round(len(rows) * AUTO_EVAL_FRACTION))
            eval_note = (f"data.eval_split auto: {n} of the {len(rows)} rows of {where} held out for the held-out "
                         f"loss (5%, at least 1; data.eval_split: null trains on every row)")
        else:
            eval_split = None
            eval_note = f"data.eval_split auto: {where} has 1 row, none to hold out; no held-out loss"
    if isinstance(eval_split, float):  # hold out a fraction of the train rows (a seeded shuffle)
        import random

        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        n_eval = max(1, round(len(rows) * eval_split))
        if n_eval >= len(rows):
            raise DataError(f"{where}: data.eval_split={eval_split} leaves no train rows out of {len(rows)}")
        held_out = [rows[i] for i in sorted(order[:n_eval])]
        rows = [rows[i] for i in sorted(order[n_eval:])]
        eval_split = None
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    if eval_split == "auto":
        eval_split = "test" if cfg.source in DATASETS else None
    if eval_split:
        held_out, eval_where = load_rows(cfg, eval_split)
        held_out = [_rename(r, cfg.columns) for r in held_out]
    else:
        eval_where = f"{where} (held out)"
    if held_out is not None and cfg.eval_rows:
        held_out = held_out[: cfg.eval_rows]
    return RowSplits(train=rows, held_out=held_out, where=where, eval_where=eval_where, eval_note=eval_note)


def prepare_data(cfg: DataConfig, tokenizer, max_len: int) -> TokenizedData:
    """The train (and held-out) rows (:func:`split_rows`) tokenized."""
    splits = split_rows(cfg)
    fmt = detect_format(splits.train[0].keys(), cfg)
    train, dropped, truncated = tokenize_rows(splits.train, tokenizer, cfg, max_len, splits.where, fmt)
    eval_ds = None
    if splits.held_out is not None:
        eval_ds, _, _ = tokenize_rows(splits.held_out, tokenizer, cfg, max_len, splits.eval_where, fmt)
    return TokenizedData(train=train, eval=eval_ds, dropped=dropped, format=fmt, truncated=truncated,
                         eval_note=splits.eval_note)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def apply_chat_template_choice(tokenizer, choice: str | None) -> str | None:
    """Set ``tokenizer.chat_template`` from data.chat_template: None keeps the tokenizer's own (chatml
    when it has none), "chatml" is ChatML, anything else is taken as a Jinja template. The
    tokenizer's original template is remembered, so a reused tokenizer can go back to it."""
    if not hasattr(tokenizer, "_nbtune_original_template"):
        tokenizer._nbtune_original_template = getattr(tokenizer, "chat_template", None)
    original = tokenizer._nbtune_original_template
    if choice is None:
        template = original or CHATML_TEMPLATE
    elif choice.strip().lower() == "chatml":
        template = CHATML_TEMPLATE
    elif "{%" in choice or "{{" in choice:
        template = choice
    else:
        raise DataError(f"data.chat_template: {choice!r} is not 'chatml' nor a Jinja template "
                        "(null keeps the tokenizer's own)")
    tokenizer.chat_template = template
    return template


def _rename(row: dict, columns: dict) -> dict:
    if not columns:
        return row
    out = dict(row)
    for canonical, theirs in columns.items():
        if theirs in row:
            out[canonical] = row[theirs]
    return out
