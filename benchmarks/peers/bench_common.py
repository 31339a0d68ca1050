"""What the three benchmark peers share: model shapes, the random-weight checkpoint, its tokenizer,
and the environment switches of the T4 emulation.

Used by peers/hf_qlora_baseline.py, peers/unsloth_peer.py and nbtune_peer.py (each in its own
process), and by models.py, which builds the checkpoints once before the peers run:

    python benchmarks/peers/bench_common.py build llama3-8b llama2-7b   # under $CKPT_ROOT (/tmp/ckpt)

Shapes are the real models' dimensions; the weights are random (``torch.manual_seed(0)``, the HF
default init), which gives the same speed and memory as real weights. ``SHAPES[name]`` holds only
config keyword arguments, so ``LlamaConfig(**SHAPES["llama3-8b"])`` still works as it did in the
original peer scripts; ``ARCHS`` names the config class for the shapes that are not Llama.

This module imports torch lazily: models.py and the CPU tests read SHAPES without it.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import time

# The two original shapes, exactly as the peer scripts had them (checkpoints built with
# max_position_embeddings=8192, which ``build_checkpoint`` keeps for every shape without its own).
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0),
    # The further shapes of benchmarks/README.md, with the dimensions of the released models.
    # Mistral-7B-v0.3: GQA 32/8, 32768 vocabulary, no sliding window.
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                       rope_theta=1000000.0, sliding_window=None, max_position_embeddings=32768),
    # Qwen2.5-7B: q/k/v carry a bias (the architecture's), untied 152064-token head.
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       use_sliding_window=False, max_window_layers=28, max_position_embeddings=32768),
    # Gemma-2-9B: head_dim 256, GeGLU (tanh), logit soft-capping, tied 256000-token embedding.
    "gemma-2-9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                       attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
                       tie_word_embeddings=True, max_position_embeddings=8192),
    # Phi-3-mini-4k: 3072 hidden, MHA 32/32, 32064 vocabulary. Stored with q/k/v and gate/up split,
    # Llama-style (as Unsloth ships Phi-3), so every peer puts LoRA on the same seven projections;
    # the FLOPs and bytes are those of the fused original.
    "phi-3-mini": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       max_position_embeddings=4096),
}
ARCHS = {"mistral-7b": "mistral", "qwen2.5-7b": "qwen2", "gemma-2-9b": "gemma2"}  # others: llama
DEFAULT_MAX_POSITIONS = 8192  # what the original peers built every checkpoint with
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def max_positions(shape: str) -> int:
    return SHAPES[shape].get("max_position_embeddings", DEFAULT_MAX_POSITIONS)


def config_for(shape: str):
    """The transformers config of a shape (Llama unless ARCHS names another family)."""
    import transformers

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
               "gemma2": "Gemma2Config"}
    cls = getattr(transformers, classes[ARCHS.get(shape, "llama")])
    kwargs = {"max_position_embeddings": DEFAULT_MAX_POSITIONS, **SHAPES[shape]}
    return cls(**kwargs)


def build_checkpoint(shape: str, path: str) -> None:
    """Save a random-weight bf16 checkpoint of ``shape`` at ``path`` (nothing if it exists).

    For llama2-7b and llama3-8b this is what the original hf_qlora_baseline.py did, step for step,
    except that it saves into ``<path>.partial`` and renames it, so a cut-short build is not reused.
    """
    if os.path.exists(path):
        return
    t = time.time()
    save_random_checkpoint(config_for(shape), path)
    print(f"# built {shape} in {time.time()-t:.1f}s", file=sys.stderr)


def save_random_checkpoint(cfg, path: str, device: str = "cuda") -> None:
    """Random weights of the transformers config ``cfg`` (``torch.manual_seed(0)``, the HF default
    init, made on ``device``), saved in bf16 under ``<path>.partial`` and renamed to ``path``."""
    import gc
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = f"{path.rstrip('/')}.partial"  # a build cut short never passes for a checkpoint
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    m.save_pretrained(tmp, max_shard_size="4GB")
    os.replace(tmp, path)
    del m; gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def ensure_tokenizer(path: str, vocab_size: int) -> None:
    """Put a word-level tokenizer of the checkpoint's vocabulary size next to it (Unsloth and
    nbtune load one with the model; the benchmark feeds token ids, so its content does not matter)."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")),
                                  bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0")
    tok.save_pretrained(path)


def checkpoint_path(shape: str, root: str | None = None) -> str:
    return f"{root or os.environ.get('CKPT_ROOT', '/tmp/ckpt')}/{shape}"


# --------------------------------------------------------------------------------------------
# T4 emulation switches, read from the environment by every peer
#   MEM_CAP_GIB=14.3            cap torch's allocator (set_per_process_memory_fraction)
#   NBTUNE_BENCH_SDPA=efficient  allow only that SDPA backend (flash | efficient | math | cudnn)
# --------------------------------------------------------------------------------------------
SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")
_SDPA_CALLS = [0]


def sdpa_backend_from_env() -> str | None:
    value = os.environ.get("NBTUNE_BENCH_SDPA", "").strip().lower()
    if value in ("", "default", "any", "all"):
        return None
    if value in ("mem_efficient", "memory-efficient", "memory_efficient", "mem-efficient"):
        value = "efficient"
    if value not in SDPA_BACKENDS:
        raise SystemExit(f"NBTUNE_BENCH_SDPA={value!r}: expected one of {', '.join(SDPA_BACKENDS)} or unset")
    return value


def apply_sdpa_backend_from_env() -> str | None:
    """Restrict torch's SDPA to the backend NBTUNE_BENCH_SDPA names, for this whole process.

    The backend switches are process-wide flags that ``F.scaled_dot_product_attention`` reads on
    every call, however the caller got hold of the function. To show that a peer's attention goes
    through SDPA at all (and so obeys them), the function is also wrapped with a call counter
    before the peer's library is imported (a ``from torch.nn.functional import
    scaled_dot_product_attention`` made later gets the wrapper); the count goes to stderr at exit
    as ``# bench-sdpa {...}``, which models.py attaches to the peer's result. Call this before
    importing transformers / unsloth / nbtune.
    """
    backend = sdpa_backend_from_env()
    if backend is None:
        return None
    import torch
    import torch.nn.functional as F

    torch.backends.cuda.enable_flash_sdp(backend == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(backend == "efficient")
    torch.backends.cuda.enable_math_sdp(backend == "math")
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")
    original = F.scaled_dot_product_attention
    if not getattr(original, "_bench_counted", False):
        def scaled_dot_product_attention(*args, **kwargs):
            _SDPA_CALLS[0] += 1
            return original(*args, **kwargs)

        scaled_dot_product_attention._bench_counted = True
        scaled_dot_product_attention.__doc__ = original.__doc__
        F.scaled_dot_product_attention = scaled_dot_product_attention
        atexit.register(_report_sdpa, backend)
    return backend


def _report_sdpa(backend: str) -> None:
    print("# bench-sdpa " + json.dumps({"backend": backend, "calls": _SDPA_CALLS[0]}), file=sys.stderr, flush=True)


def sdpa_calls() -> int:
    return _SDPA_CALLS[0]


def mem_cap_gib() -> float:
    return float(os.environ.get("MEM_CAP_GIB", 0) or 0)


def apply_mem_cap(cap_gib: float) -> None:
    """Let torch's allocator reserve at most ``cap_gib`` GiB on GPU 0 (after the checkpoint is built)."""
    if cap_gib:
        import torch

        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)


class HostMemory:
    """A metrics listener measuring this process's host memory where the planner's host terms live.

    A thread samples /proc/self/status every 20 ms: ``RssAnon + RssShmem`` is memory the process
    owns (what a memory cgroup cannot take back), ``RssFile`` is file pages such as a memory-mapped
    checkpoint (the kernel reclaims them under a cap, so ``VmHWM``, which counts them, overstates a
    loading peak). Fields (GiB): ``rss_baseline_gib`` (after CUDA's start), ``anon_load_peak_gib``
    and ``file_at_load_peak_gib`` (up to the first step: model loading), ``anon_train_peak_gib`` and
    ``file_at_train_peak_gib`` (from the first step on: the libraries' code pages, the checkpoint's
    files closed), ``rss_hwm_gib`` (the kernel's VmHWM), and ``pinned_peak_gib`` (torch's pinned host
    allocator; the offload pool's page-locked slabs are ordinary anonymous memory, in ``anon_*``)."""

    KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, interval_s: float = 0.02):
        import threading

        self.fields, self.phase, self.peaks = {}, "load", {"load": (0.0, 0.0), "train": (0.0, 0.0)}
        self.interval_s, self.stop = interval_s, threading.Event()
        self.thread = threading.Thread(target=self._sample, name="host-memory", daemon=True)

    @classmethod
    def read(cls) -> dict:
        out = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in cls.KEYS:
                        out[key] = int(value.split()[0]) * 1024 / 2**30
        except OSError:
            pass
        return out

    def sample(self) -> None:
        """One reading, kept where it is the current phase's peak."""
        now = self.read()
        anon = now.get("RssAnon", 0.0) + now.get("RssShmem", 0.0)
        if anon > self.peaks[self.phase][0]:
            self.peaks[self.phase] = (anon, now.get("RssFile", 0.0))

    def _sample(self) -> None:
        while True:
            self.sample()
            if self.stop.wait(self.interval_s):
                return

    def begin(self) -> None:
        """The baseline now (CUDA started, nothing loaded), then sampling until :meth:`end`."""
        self.fields["rss_baseline_gib"] = round(self.read().get("VmRSS", 0.0), 3)
        self.thread.start()

    def end(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self.sample()
        (load_anon, load_file), (train_anon, train_file) = self.peaks["load"], self.peaks["train"]
        self.fields.update(anon_load_peak_gib=round(load_anon, 3), file_at_load_peak_gib=round(load_file, 3),
                           anon_train_peak_gib=round(train_anon, 3), file_at_train_peak_gib=round(train_file, 3),
                           rss_hwm_gib=round(self.read().get("VmHWM", 0.0), 3))
        try:
            import torch

            pinned = torch.cuda.host_memory_stats().get("allocated_bytes.peak") if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - a torch without the pinned allocator's statistics
            pinned = None
        if pinned is not None:
            self.fields["pinned_peak_gib"] = round(pinned / 2**30, 3)

    def training(self) -> None:
        """From here on, samples count as training (loading is over)."""
        self.phase = "train"

    def __call__(self, rec: dict) -> None:
        """As a metrics listener: training starts with the run's ``start`` record."""
        if rec.get("event") == "start":
            self.training()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "build":
        raise SystemExit("usage: bench_common.py build SHAPE [SHAPE ...]   (under $CKPT_ROOT, default /tmp/ckpt)")
    for name in sys.argv[2:]:
        p = checkpoint_path(name)
        build_checkpoint(name, p)
        ensure_tokenizer(p, SHAPES[name]["vocab_size"])
        print(json.dumps({"built": name, "path": p}), flush=True)
