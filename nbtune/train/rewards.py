"""Reward functions for ``train.method: grpo`` (``grpo.rewards``), in TRL's reward signature.

TRL's GRPOTrainer calls each reward function once per generation batch as
``f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)``, every data
column (here ``answer``) as a list with one value per completion, and takes one float per
completion back (None: not scored). The rewards of the functions are summed.

Built-ins (GSM8K's form: a worked solution whose last line is ``#### <final number>``):

- ``correctness``: 1.0 when the completion's final number equals the row's answer, else 0.0. The
  completion's final number is the one after its last ``####``, else the last number it writes
  ("... so she has 72 apples." counts); the answer's is the one after its last ``####`` (a GSM8K
  answer), else its last number (an answer column of bare numbers). Thousands separators, a
  currency sign and trailing zeros do not matter (``1,000`` = ``1000``, ``$5.00`` = ``5``).
- ``format``: 1.0 when the completion's last non-empty line is ``#### <number>``, else 0.0.

Anything else is ``module:function``: a function of the user's, imported by name (the module from
the working folder or the Python path). Names are checked when the config is built, so a typo is a
config error before anything loads.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from decimal import Decimal, InvalidOperation

MARK = "####"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FINAL_LINE = re.compile(r"^####\s*\$?\s*-?(\d[\d,]*(\.\d+)?|\.\d+)\s*\.?$")


def _text(completion) -> str:
    """A completion's text: a string, or chat form (a list of turns, or one turn) whose contents are joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    return "".join(str(turn.get("content") or "") for turn in completion)


def _value(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "")).normalize()
    except InvalidOperation:
        return None


def final_number(text) -> Decimal | None:
    """The number after the last ``####`` of ``text`` (a GSM8K answer), else the last number in it; None
    when it has none."""
    text = str(text).replace("$", "")
    head, sep, tail = text.rpartition(MARK)
    if sep:
        found = _NUMBER.search(tail)
        if found:
            return _value(found.group())
    numbers = _NUMBER.findall(text)
    return _value(numbers[-1]) if numbers else None


def correctness(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    """1.0 per completion whose final number equals its row's answer, 0.0 otherwise (None: no answer)."""
    if answer is None:
        answer = [None] * len(completions)
    out = []
    for completion, expected in zip(completions, answer):
        target = None if expected is None else final_number(expected)
        if target is None:
            out.append(None)
            continue
        out.append(1.0 if final_number(_text(completion)) == target else 0.0)
    return out


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 per completion whose last non-empty line is ``#### <number>``, else 0.0."""
    out = []
    for completion in completions:
        lines = [line.strip() for line in _text(completion).strip().splitlines() if line.strip()]
        out.append(1.0 if lines and _FINAL_LINE.match(lines[-1]) else 0.0)
    return out


format_reward.__name__ = "format"  # TRL logs a reward under its function's name: rewards/format/mean

BUILT_IN = {"correctness": correctness, "format": format_reward}
NEEDS_ANSWER = ("correctness",)  # built-ins that read the row's answer column


def _import(name: str):
    """``module:function`` -> the function, or a ValueError saying what is wrong and the fix."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{name!r} is neither a built-in reward ({', '.join(BUILT_IN)}) nor 'module:function' "
                         "(a function of yours, e.g. my_rewards:length_penalty for length_penalty in my_rewards.py); "
                         "fix the name in grpo.rewards")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise ValueError(f"{name!r}: importing {module_name!r} failed ({type(e).__name__}: {e}); put "
                             f"{module_name.replace('.', '/')}.py in the working folder or on PYTHONPATH, or fix "
                             "the name in grpo.rewards") from None
        sys.path.append(os.getcwd())  # the CLI's path holds its own folder, not the working one
        return _import(name)
    except Exception as e:  # the module itself raised while being imported
        raise ValueError(f"{name!r}: importing {module_name!r} raised {type(e).__name__}: {e}; fix the module, or "
                         "remove it from grpo.rewards") from None
    func = getattr(module, attr, None)
    if func is None:
        raise ValueError(f"{name!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no {attr!r}; "
                         "name a function it defines in grpo.rewards")
    if not callable(func):
        raise ValueError(f"{name!r}: {module_name}.{attr} is a {type(func).__name__}, not a function; name a "
                         "function in grpo.rewards")
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return func
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ValueError(f"{name!r}: {module_name}.{attr} takes no **kwargs; TRL calls a reward function with "
                         "prompts, completions, completion_ids, trainer_state and every data column by keyword: "
                         f"define it as def {attr}(prompts, completions, **kwargs) and return one float per "
                         "completion")
    return func


def check_reward_names(names: list[str]) -> None:
    """Every name in ``grpo.rewards`` resolves (a built-in, or ``module:function`` that imports), once each."""
    if not names:
        raise ValueError("no reward function: list at least one in grpo.rewards (built-ins: "
                         f"{', '.join(BUILT_IN)}; or 'module:function')")
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{name!r} is listed twice (its reward would count double); list it once in grpo.rewards")
        seen.add(name)
        if name not in BUILT_IN:
            _import(name)


def load_rewards(names: list[str]) -> list:
    """The reward functions of ``grpo.rewards``, in order."""
    return [BUILT_IN[name] if name in BUILT_IN else _import(name) for name in names]


def reward_name(name: str) -> str:
    """The name TRL logs a reward under (``rewards/<name>/mean``): a built-in's own, else the function's."""
    return BUILT_IN[name].__name__ if name in BUILT_IN else name.partition(":")[2]
