"""The small real data sets nbtune ships by name (GSM8K, and GSM8K as preference pairs), with a
fixed train / held-out split."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .fetch import AssetError, cache_dir, fetch_file
from .registry import DATASETS

SPLITS = ("train", "test")


def data_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def pull_dataset(name: str) -> Path:
    """Return the directory holding ``train.jsonl`` and ``test.jsonl`` of a known data set."""
    if name not in DATASETS:
        raise AssetError(f"unknown embedded data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    asset = DATASETS[name]
    out = data_dir(name)
    if all((out / f"{s}.jsonl").is_file() for s in SPLITS):
        return out
    if asset.derived_from:
        return _derive(asset, out)
    raw = fetch_file(
        asset.source,
        cache_dir() / "downloads" / f"{name}-{os.path.basename(asset.source.member)}",
        what=f"the data set {name}",
        local_hint="Or train on a local file instead: data: {source: /path/to/data.jsonl}.",
    )
    with open(raw, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) <= asset.train_rows:
        raise AssetError(f"{raw} has {len(rows)} rows; expected more than {asset.train_rows}")
    _write_splits(out, {"train": rows[: asset.train_rows], "test": rows[asset.train_rows:]})
    return out


def _derive(asset, out: Path) -> Path:
    """A data set built from another one's splits (gsm8k-preferences from gsm8k), split by split."""
    from .preferences import preference_rows

    base = pull_dataset(asset.derived_from)
    splits = {}
    for split in SPLITS:
        with open(base / f"{split}.jsonl", encoding="utf-8") as f:
            splits[split] = preference_rows([json.loads(line) for line in f if line.strip()])
    _write_splits(out, splits)
    return out


def _write_splits(out: Path, splits: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, part in splits.items():  # each file appears whole or not at all
        tmp = out / f"{split}.jsonl.part-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out / f"{split}.jsonl")


def dataset_split_path(name: str, split: str) -> Path:
    if split not in SPLITS:
        raise AssetError(f"data set {name!r} has splits {', '.join(SPLITS)}, not {split!r}")
    return pull_dataset(name) / f"{split}.jsonl"
