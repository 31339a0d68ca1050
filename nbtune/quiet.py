"""Quiet by default: the third-party output a run makes irrelevant is not shown.

What a newcomer saw first was not nbtune: bitsandbytes' note that an optional CPU kernel package
is missing (a kernel for 4-bit weights on the CPU, where nbtune trains full-precision weights),
transformers' notice that it ignores a tokenizer clean-up setting that would corrupt a BPE
tokenizer's output (nbtune's decoding is right without it), deprecation FutureWarnings addressed
to the code that calls a renamed transformers API (transformers >= 5.2x renamed gradient
checkpointing to activation checkpointing and ``past_key_values`` to ``cache``; nbtune's calls
work with either name), and the progress bars of weight loading, shard writing, GGUF conversion
and data set preparation, interleaved with nbtune's own progress lines.

- :func:`apply`, once per process, by every entry point (the CLI, ``nbtune.<name>``, the
  ``%%finetune`` magic, ``finetune``, ``load_model``): filters exactly those warnings (category,
  message and module: :data:`WARNINGS`) and log records (logger and message:
  :data:`LOG_RECORDS`). Anything else still shows.
- :func:`loading`, a context around nbtune's loading, conversion and saving: no progress bars
  from transformers, datasets or transformers' GGUF reader, and the ``datasets`` and
  ``huggingface_hub`` loggers at ERROR. transformers' own logger keeps WARNING (its load report
  names missing weights), and downloads keep their bar (huggingface_hub's: the one long wait).

``NBTUNE_VERBOSE=1`` turns both off: everything third-party shows, as without nbtune.
Torch-free at import (the command line applies it before anything heavy is imported).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import warnings

from ._env import env_flag

VERBOSE_ENV = "NBTUNE_VERBOSE"

# where a deprecated keyword is passed from: the libraries of a run, and torch's module call and
# checkpoint, through which a model's decorated ``forward`` is called
_CALLERS = r"(transformers|peft|trl|accelerate|nbtune|torch\.nn\.modules\.module|torch\.utils\.checkpoint)(\.|$)"

# (category, message regex, module regex): warnings.filterwarnings entries (messages match from their start)
WARNINGS = (
    # transformers >= 5.2x: gradient_checkpointing* -> activation_checkpointing* (modeling_utils, training_args)
    (FutureWarning, r"`(is_)?gradient_checkpointing\w*` is deprecated .*Use `(is_)?activation_checkpointing\w*`",
     r"transformers(\.|$)"),
    (FutureWarning, r"`\w+` only defines `gradient_checkpointing_enable`, which is deprecated", r"transformers(\.|$)"),
    # transformers >= 5.2x: the past_key_values keyword -> cache (warned at the caller's line)
    (FutureWarning, r"`past_key_values` is deprecated .*Use `cache` instead", _CALLERS),
    # ... and when generate() passes the cache as ``cache`` while a forward passes on its default
    # past_key_values=None, the None is ignored: nothing changes
    (FutureWarning, r"Both `past_key_values` and `cache` are set for `[\w.]+`\. Using `cache=.*` and ignoring "
                    r"deprecated `past_key_values=None`\.$", _CALLERS),
)

# logger name -> message regexes of its records that are dropped
LOG_RECORDS = {
    "bitsandbytes.backends.cpu.ops": (r"Failed to load CPU gemm_4bit_forward from kernels-community",),
    # kernels (transformers >= 5.25's dependency), offline, on bitsandbytes' CPU kernel lookup above
    "kernels._internals.hf_hub": (r"Skipping publisher trust check for 'kernels-community/",),
    "transformers.tokenization_utils_tokenizers": (r"Ignoring clean_up_tokenization_spaces=True for BPE tokenizer",),
    "transformers.utils.generic": (r"`past_key_values`/`cache_params` are deprecated\. Use `cache` instead",),
}

QUIET_LOGGERS = ("datasets", "huggingface_hub")  # at ERROR inside loading()

_applied = False


def verbose() -> bool:
    """NBTUNE_VERBOSE=1: show all third-party output (nothing filtered, no bar turned off)."""
    return env_flag(VERBOSE_ENV, default=False)


class DropRecords(logging.Filter):
    """A logger's filter that drops the records whose message matches one of ``patterns``."""

    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's to report, not ours to hide
            return True
        return not any(p.match(message) for p in self.patterns)


def apply() -> None:
    """Install the warning and log-record filters (once per process; nothing with NBTUNE_VERBOSE=1)."""
    global _applied
    if _applied or verbose():
        return
    _applied = True
    for category, message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in LOG_RECORDS.items():
        logging.getLogger(name).addFilter(DropRecords(patterns))


@contextlib.contextmanager
def loading():
    """No third-party progress bars and quieter data/hub loggers for the duration (see the module
    docstring). It acts on the libraries imported when it is entered: import what the block uses
    first. Everything is restored on exit."""
    if verbose():
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(_transformers_bars_off())
        stack.enter_context(_datasets_bars_off())
        stack.enter_context(_gguf_bar_off())
        stack.enter_context(_loggers_at(logging.ERROR, QUIET_LOGGERS))
        yield


@contextlib.contextmanager
def _transformers_bars_off():
    """transformers' bars ("Loading weights", "Writing model shards") off; huggingface_hub's
    (downloads) as they were: transformers' switch turns both off, so hub's state is put back."""
    tf_logging = sys.modules.get("transformers.utils.logging")
    if tf_logging is None or not tf_logging.is_progress_bar_enabled():
        yield
        return
    hub_states = _hub_bar_states()
    saved = dict(hub_states) if hub_states is not None else None
    tf_logging.disable_progress_bar()
    _restore(hub_states, saved)
    try:
        yield
    finally:
        tf_logging.enable_progress_bar()
        _restore(hub_states, saved)


def _hub_bar_states():
    module = sys.modules.get("huggingface_hub.utils.tqdm")
    states = getattr(module, "progress_bar_states", None)
    return states if isinstance(states, dict) else None


def _restore(states, saved) -> None:
    if states is not None:
        states.clear()
        states.update(saved)


@contextlib.contextmanager
def _datasets_bars_off():
    """datasets' bars ("Generating train split", "Map") off."""
    datasets = sys.modules.get("datasets")
    disable = getattr(datasets, "disable_progress_bars", None)
    if disable is None or datasets.are_progress_bars_disabled():
        yield
        return
    disable()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


@contextlib.contextmanager
def _gguf_bar_off():
    """transformers' GGUF reader draws its "Converting and de-quantizing GGUF tensors" bar with
    plain tqdm, outside transformers' switch: its ``tqdm`` is a disabled one for the duration."""
    module = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(module, "tqdm", None)
    if bar is None:
        yield
        return
    module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        module.tqdm = bar


@contextlib.contextmanager
def _loggers_at(level: int, names):
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < level:
            lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)
