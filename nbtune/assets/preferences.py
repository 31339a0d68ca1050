"""The embedded preference set ``gsm8k-preferences``: GSM8K rows made into chosen / rejected pairs.

Every GSM8K answer is a worked solution that ends in ``#### <final number>``. A pair is

- prompt: the question, as one user turn;
- chosen: the real worked solution, as one assistant turn;
- rejected: the same worked solution with only its final number changed, as one assistant turn:
  a reply that contradicts its own working, which a model can learn to tell from the real one.

The change is deterministic (no random numbers): row ``i`` of a split adds ``OFFSETS[i % 8]`` to
the final number (when that would make a non-negative answer negative, the offset's absolute
value is added instead), and the number keeps its thousands separators when it had them. The
splits are GSM8K's own (1,000 train rows, 319 held out), so the held-out pairs ask questions the
training pairs never ask. Rows are chat-form preference rows, the format
:mod:`nbtune.train.preference_data` reads::

    {"prompt": [{"role": "user", "content": Q}],
     "chosen": [{"role": "assistant", "content": A}],
     "rejected": [{"role": "assistant", "content": A with another final number}]}
"""
from __future__ import annotations

OFFSETS = (1, -1, 2, -3, 10, -10, 5, 7)
MARK = "####"


class NoFinalNumber(ValueError):
    """A worked solution without a ``#### <integer>`` line."""


def wrong_final(answer: str, index: int) -> str:
    """``answer`` with the integer after its last ``####`` changed by ``OFFSETS[index % 8]``."""
    head, sep, tail = answer.rpartition(MARK)
    text = tail.strip()
    if not sep or not text.replace(",", "").lstrip("-").isdigit():
        raise NoFinalNumber(f"no '#### <integer>' at the end of {answer[-60:]!r}")
    value = int(text.replace(",", ""))
    offset = OFFSETS[index % len(OFFSETS)]
    wrong = value + offset
    if value >= 0 > wrong:
        wrong = value + abs(offset)
    shown = f"{wrong:,}" if "," in text else str(wrong)
    return f"{head}{MARK} {shown}"


def preference_rows(rows: list[dict]) -> list[dict]:
    """GSM8K rows ({question, answer}) -> chat-form preference rows, in order, one per row."""
    out = []
    for i, row in enumerate(rows):
        out.append({
            "prompt": [{"role": "user", "content": row["question"]}],
            "chosen": [{"role": "assistant", "content": row["answer"]}],
            "rejected": [{"role": "assistant", "content": wrong_final(row["answer"], i)}],
        })
    return out
