"""Test set-up shared by every test.

On a machine without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be
set before any ``@triton.jit`` function is defined, so it is set here, before nbtune is imported.
GPU tests carry the ``gpu`` marker and are skipped where CUDA is absent.
"""
import os
import warnings

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest -n N (pytest-xdist): the CPU's cores are shared out between the workers (and the processes
# their tests start), so N workers do not each run torch with every core
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and not HAS_CUDA:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)

# gpu="auto" plans judge host RAM only where a test says how much there is: no verdict depends on the
# RAM of the machine the tests run on
os.environ.setdefault("NBTUNE_HOST_RAM", "off")

# Never reach a hub from the tests: models and data come from local paths or shipped packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_mode(monkeypatch):
    """Set NBTUNE_KERNELS for one test: ``kernel_mode("triton")``."""

    def set_mode(mode: str):
        monkeypatch.setenv("NBTUNE_KERNELS", mode)

    return set_mode


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model's converted checkpoint (pulled once into the user cache)."""
    from nbtune.assets import pull_model

    return pull_model("smollm2-135m-instruct", quiet=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """A randomly initialised 2-layer Llama (hidden 64, max_position_embeddings 512) with SmolLM2's
    tokenizer, saved as a checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path



@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, names)`` -> {key: calls so far}: each ``module.<name>`` is wrapped for the
    test (it still runs) and its calls counted under its name (``names`` a list) or under
    ``names[name]`` (a dict name -> key). Keys start at 0."""

    def install(module, names):
        keys = names if isinstance(names, dict) else {name: name for name in names}
        counts = dict.fromkeys(keys.values(), 0)
        for name, key in keys.items():
            original = getattr(module, name)

            def counted(*args, _key=key, _original=original, **kwargs):
                counts[_key] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
        return counts

    return install

WORD_VOCAB = 512
WORD_ROWS = 64


@pytest.fixture(scope="session")
def word_model(tmp_path_factory):
    """A random 4-layer Llama (hidden 256) and a whitespace word tokenizer: word "w<i>" is id i (i >= 3;
    the special tokens are spelled so that no word contains one: transformers splits text on them), and
    64 rows of word sequences with a learnable pattern (``data``). Needs neither a hub nor the embedded
    model, so it serves the GPU tests on machines that reach no package index."""
    import json
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("word-llama")
    words = {"<pad>": 0, "<unk>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, WORD_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=WORD_VOCAB, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    rng = random.Random(0)
    rows = []
    for _ in range(WORD_ROWS):  # a cycle of 16 words from a random start: learnable, lengths 24..96
        start, n = rng.randrange(3, WORD_VOCAB - 16), rng.randrange(24, 97)
        rows.append({"text": " ".join(f"w{start + (k % 16)}" for k in range(n))})
    data = path / "words.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, data
