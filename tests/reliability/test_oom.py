"""Out of GPU memory (issue 8): the error is caught, the message carries the planner's advice, the
run's memory is released (the kernel stays usable) and the last checkpoint is kept.

CPU: a real run of the tiny model whose third training forward raises torch's CUDA OOM error (the
class is constructible without a GPU); the run's trainer, optimizer and LoRA weights must be gone
afterwards (weak references), the cached base model clean, and a second run must work.
GPU (marker ``gpu``): a real OOM under ``torch.cuda.set_per_process_memory_fraction``, with
``torch.cuda.memory_allocated()`` back at its level before the run.
"""
import gc
import weakref

import pytest
import torch

import nbtune
from nbtune.train import build_config, session
from nbtune.train.checkpoint import complete_checkpoints
from nbtune.train.oom import GPUOutOfMemoryError, is_cuda_oom, needed_gib, oom_advice

from .conftest import RaiseInForward, jsonl, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")

TORCH_TEXT = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.74 GiB of which "
              "1.23 GiB is free. Including non-PyTorch memory, this process has 13.51 GiB memory in use.")


def oom_at(at: int) -> RaiseInForward:
    """Forward hook raising torch's CUDA OOM error at the ``at``-th training forward."""
    return RaiseInForward(at, lambda: torch.cuda.OutOfMemoryError(TORCH_TEXT))


def test_an_oom_during_training_is_caught_cleaned_up_and_explained(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import transformers

    session.clear()
    trainers, weights, hooks = [], [], []
    real_init = transformers.Trainer.__init__

    def tracked_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        trainers.append(weakref.ref(self))

    def on_start(rec):  # the run has loaded (and cached) its base and added LoRA: fault and watch them
        if rec.get("event") == "start":
            base = session._SLOT["model"]
            hooks.append(base.model.layers[0].register_forward_hook(oom_at(3)))
            weights.extend(weakref.ref(p) for p in session._SLOT["peft"].parameters() if p.requires_grad)

    monkeypatch.setattr(transformers.Trainer, "__init__", tracked_init)
    out = tmp_path / "oom"
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=6, save_steps=1)
    with pytest.raises(GPUOutOfMemoryError) as info:
        nbtune.finetune(cfg, listeners=[on_start], dashboard=False, progress=False)
    hooks[0].remove()
    err = info.value
    msg = str(err)
    assert "the GPU ran out of memory while training at step 3 of 6" in msg
    assert "train.batch_size: 1, model.max_seq_length: 64" in msg
    assert "Advice: the planner expected a peak of" in msg and "planned for the memory it found" in msg
    assert "kernel is still usable" in msg and "Tried to allocate 2.00 GiB" in msg
    assert err.phase == "training" and err.step == 2
    # the error keeps no frame of the failed run: no cause, no context
    assert err.__cause__ is None and err.__context__ is None
    # everything the run held is gone; the cached base is clean (no LoRA left on it)
    gc.collect()
    assert trainers and all(ref() is None for ref in trainers)
    assert weights and all(ref() is None for ref in weights)
    base = session._SLOT["model"]
    assert session._SLOT["peft"] is None and not [n for n, _ in base.named_modules() if "lora_" in n]
    assert not any(p.requires_grad for p in base.parameters())
    # the trained work is kept: the checkpoint of the last completed step
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]

    # the kernel is usable: the same model runs again (reused, not reloaded) and resumes from step 2
    again = nbtune.finetune(cfg, resume=True, dashboard=False, progress=False)
    assert again.resumed_from == 2 and again.steps == 6 and session._SLOT["model"] is base
    session.clear()


def test_an_oom_while_loading_the_model_says_so(world, monkeypatch):
    import transformers

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(TORCH_TEXT)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_memory)
    with pytest.raises(GPUOutOfMemoryError, match="ran out of memory while loading the model") as info:
        nbtune.finetune(world.config(), dashboard=False, progress=False, reuse_model=False)
    assert info.value.step is None
    world.check()  # nothing written: the previous run's folder is as it was


def test_other_errors_pass_through_unchanged(world, monkeypatch):
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="some other failure") as info:
        nbtune.finetune(world.config(), dashboard=False, progress=False, reuse_model=False)
    assert not isinstance(info.value, GPUOutOfMemoryError)


def test_what_counts_as_out_of_memory():
    assert is_cuda_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_cuda_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert is_cuda_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_cuda_oom(RuntimeError("shape mismatch")) and not is_cuda_oom(MemoryError())
    assert needed_gib(TORCH_TEXT) == pytest.approx(14.74 - 1.23 + 2.0)
    assert needed_gib("CUDA out of memory.") is None


def test_the_advice_is_the_planners():
    too_big = build_config(model={"name": "llama-3.1-8b", "max_seq_length": 4096, "load_in_4bit": False},
                           train={"batch_size": 8, "optimizer": "adamw", "gradient_checkpointing": "off"})
    advice = oom_advice(too_big, TORCH_TEXT, gpu="T4")
    plan = nbtune.plan_from_config(too_big, gpu="T4")
    assert not plan.fits and advice == "the planner: " + plan.suggest().message
    assert "Smallest change that fits" in advice
    fits = build_config(model={"name": "llama-3.1-8b", "max_seq_length": 1024},
                        train={"batch_size": 1, "gradient_checkpointing": "offload"})
    plan = nbtune.plan_from_config(fits, gpu="T4")
    assert plan.fits
    advice = oom_advice(fits, f"CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of "
                              f"14.75 GiB of which {14.75 - plan.peak_gib + 1:.2f} GiB is free.", gpu="T4")
    assert f"the planner expected a peak of {plan.peak_gib:.2f} GiB" in advice and "needed about" in advice
    assert "Smallest change that fits" in advice


def test_advice_for_auto_names_the_mode_the_run_used(monkeypatch):
    """Data parallel, "auto" took plain checkpointing; the GPU had less memory than planned: the
    advice for the memory found is to name offloaded checkpointing (auto would pick plain again)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = build_config(model={"name": "llama-3.1-8b", "max_seq_length": 2048}, train={"batch_size": 2})
    plan = nbtune.plan_from_config(cfg, gpu="H200")
    assert plan.settings.gradient_checkpointing == "plain" and plan.checkpointing_auto
    needed = plan.peak_gib * 1.08  # found: less than plain needs, more than offloading does
    advice = oom_advice(cfg, f"CUDA out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total capacity of "
                             f"139.81 GiB of which {139.81 - needed + 1:.2f} GiB is free.", gpu="H200")
    assert "Smallest change that fits: gradient_checkpointing: plain -> offload" in advice, advice


def test_no_plan_still_gives_concrete_advice(tmp_path):
    odd = tmp_path / "odd-model"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "mystery"}')
    advice = oom_advice(build_config(model={"name": str(odd)}), TORCH_TEXT, gpu="T4")
    assert "lower train.batch_size" in advice and "model.max_seq_length" in advice


# ----------------------------------------------------------------------------- a real OOM on the GPU
@pytest.mark.gpu
def test_a_real_oom_on_the_gpu_returns_the_memory_and_the_next_run_works(offline_model_dir, tmp_path):
    """Allocation accounting: memory_allocated() after the failed run is where it was before it."""
    slack = 16 * 2**20
    long_rows = [{"prompt": f"Count {i}:", "completion": " ".join(["one two three"] * 200)} for i in range(64)]
    data = tmp_path / "long.jsonl"
    data.write_text(jsonl(long_rows))

    def config(name, **train):
        cfg = tiny_config(offline_model_dir, data, tmp_path / name, max_steps=2, **train)
        cfg["model"]["max_seq_length"] = 512
        return cfg

    def cap(extra_bytes):  # what torch may reserve from now on: what it holds plus extra_bytes
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + extra_bytes) / total)

    session.clear()
    first = nbtune.finetune(config("small"), dashboard=False, progress=False)  # loads and caches the base
    assert first.steps == 2
    del first
    gc.collect()
    torch.cuda.empty_cache()

    # 1. the base is cached (the notebook's usual case): the failed run gives back all it took
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cap(128 * 2**20)
    try:
        with pytest.raises(GPUOutOfMemoryError) as info:
            nbtune.finetune(config("big", batch_size=64), dashboard=False, progress=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    msg = str(info.value)
    assert "the GPU ran out of memory while" in msg and "train.batch_size: 64" in msg and "Advice:" in msg
    assert info.value.__context__ is None and info.value.__cause__ is None
    gc.collect()
    after = torch.cuda.memory_allocated()
    assert torch.cuda.max_memory_allocated() > before + 4 * 2**20  # the run did take memory ...
    assert after <= before + slack, (before, after)  # ... and gave it all back

    # 2. the kernel is usable: a small run works, on the same cached base
    again = nbtune.finetune(config("again"), dashboard=False, progress=False)
    assert again.steps == 2 and all(r.get("loss") is not None for r in again.metrics if r["event"] == "train")
    del again

    # 3. a run that loads its own model (reuse_model=False) gives back the model too
    session.clear()
    gc.collect()
    torch.cuda.empty_cache()
    bare = torch.cuda.memory_allocated()
    cap(128 * 2**20)
    try:
        with pytest.raises(GPUOutOfMemoryError):
            nbtune.finetune(config("big2", batch_size=64), dashboard=False, progress=False, reuse_model=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    gc.collect()
    assert torch.cuda.memory_allocated() <= bare + slack, (bare, torch.cuda.memory_allocated())
