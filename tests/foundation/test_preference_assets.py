"""The embedded preference set: GSM8K's splits as chosen / rejected pairs, built deterministically."""
import json

import pytest

from nbtune.assets import pull_dataset
from nbtune.assets.preferences import NoFinalNumber, preference_rows, wrong_final


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_pairs_follow_gsm8k_split_by_split():
    base, pairs = pull_dataset("gsm8k"), pull_dataset("gsm8k-preferences")
    for split, n in (("train", 1000), ("test", 319)):
        gsm, pref = _rows(base / f"{split}.jsonl"), _rows(pairs / f"{split}.jsonl")
        assert len(pref) == len(gsm) == n
        for g, p in zip(gsm, pref):
            assert p["prompt"] == [{"role": "user", "content": g["question"]}]
            assert p["chosen"] == [{"role": "assistant", "content": g["answer"]}]
            chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
            assert p["rejected"][0]["role"] == "assistant" and rejected != chosen
            # only the final number differs
            assert rejected.rpartition("####")[0] == chosen.rpartition("####")[0]
        assert pref == preference_rows(gsm)  # the same pairs every time


def test_wrong_final_changes_only_the_number():
    assert wrong_final("so 9 * 2 = 18\n#### 18", 0) == "so 9 * 2 = 18\n#### 19"
    assert wrong_final("x\n#### 18", 1) == "x\n#### 17"
    assert wrong_final("x\n#### 0", 1) == "x\n#### 1"  # never a negative answer for a non-negative one
    assert wrong_final("x\n#### 1,450,000", 4) == "x\n#### 1,450,010"  # separators kept
    assert wrong_final("x\n#### -4", 0) == "x\n#### -3"
    with pytest.raises(NoFinalNumber):
        wrong_final("no final line", 0)
    with pytest.raises(NoFinalNumber):
        wrong_final("x\n#### about 3", 0)
