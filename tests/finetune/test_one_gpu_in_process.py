"""A run in this process (no launcher) trains on one GPU however many are visible: no nn.DataParallel.

transformers' TrainingArguments, outside a launcher, sets ``n_gpu`` to ``torch.cuda.device_count()``
and its Trainer then wraps the model in ``nn.DataParallel``, which TRL's SFTTrainer refuses
("does not support `nn.DataParallel`"): what ``nbtune.finetune(config)`` met in a notebook on a
2-GPU machine. On the CPU the real arguments class is built with ``device_count`` reporting 2
GPUs, which is the line of ``_setup_devices`` that leads there (with no CUDA the device stays the
CPU); on a machine with 2 or more GPUs a real in-process run trains on the first one alone.
"""
import math
import warnings

import pytest
import torch

import nbtune
from nbtune.train import session
from nbtune.train.config import build_config
from nbtune.train.data import prepare_data
from nbtune.train.distributed import DistributedSetupError
from nbtune.train.trainer import sft_trainer_class

from .conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def _args_seeing_two_gpus(out):
    """SFTConfig as transformers builds it in a process that sees 2 GPUs and no launcher."""
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), use_cpu=False, bf16=False, fp16=False, max_steps=1,
                     per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=64,
                     remove_unused_columns=False, optim="adamw_torch", report_to="none", disable_tqdm=True,
                     save_strategy="no", logging_steps=1)


def _pretend_two_gpus(monkeypatch):
    """``torch.cuda.device_count()`` reports 2 (transformers' ``n_gpu``) while CUDA stays as available
    as it really is. A CUDA build of torch answers ``is_available()`` from the device count when
    the NVML-based check is on (accelerate switches it on to probe without initializing CUDA), so
    the count alone would make accelerate pick a CUDA device this machine does not have: the model
    moved there, and TRL's trainers asking its name for their usage report (when ``CI`` is unset)."""
    available = torch.cuda.is_available()  # the real answer, before the count is faked
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


def test_nbtune_trainer_takes_one_gpu_where_transformers_counts_two(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.training_args import ParallelMode
    from trl import SFTTrainer

    _pretend_two_gpus(monkeypatch)
    cfg = build_config(tiny_config(tiny_model_dir, tiny_data, tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = prepare_data(cfg.data, tokenizer, cfg.model.max_seq_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nbtune.add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8,
                                gradient_checkpointing="off")
    args = _args_seeing_two_gpus(tmp_path / "trl")
    assert args.n_gpu == 2 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED  # nn.DataParallel's way
    with pytest.raises(ValueError, match="does not support `nn.DataParallel`"):
        SFTTrainer(model=model, args=args, train_dataset=data.train, processing_class=tokenizer)

    args = _args_seeing_two_gpus(tmp_path / "nbtune")
    trainer = sft_trainer_class()(model=model, args=args, train_dataset=data.train, processing_class=tokenizer)
    assert args.n_gpu == 1 and args.parallel_mode == ParallelMode.NOT_PARALLEL
    assert args.train_batch_size == 2  # per device, not multiplied by the GPUs counted
    trainer.train()
    assert trainer.state.global_step == 1
    assert not isinstance(trainer.model_wrapped, torch.nn.DataParallel)


def _word_config(word_model, out) -> dict:
    model_dir, data = word_model
    return {
        "model": {"name": str(model_dir), "max_seq_length": 128, "load_in_4bit": True},
        "data": {"source": str(data), "format": "text", "responses_only": False, "eval_split": None},
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 1, "lr": 5e-3, "warmup_steps": 0,
                  "optimizer": "adamw_8bit", "seed": 1},
        "output": {"dir": str(out)},
    }


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason="needs 2 or more GPUs visible to this process (the case that made "
                                           "transformers use nn.DataParallel)")


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_in_process_finetune_trains_on_the_first_gpu_only(word_model, tmp_path):
    session.clear()
    other = torch.cuda.device_count() - 1
    before = torch.cuda.memory_reserved(other)
    torch.cuda.reset_peak_memory_stats(other)
    result = nbtune.finetune(_word_config(word_model, tmp_path / "run"), dashboard=False, progress=False)
    assert result.steps == 3 and result.world_size == 1
    losses = [r["loss"] for r in result.metrics if r.get("event") == "train" and "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert next(result.model.parameters()).device == torch.device("cuda", 0)
    assert torch.cuda.max_memory_reserved(other) == before  # nothing was replicated onto another GPU
    start = result.metrics[0]
    assert start["world_size"] == 1 and start["gradient_checkpointing"] == "offload"  # auto, one GPU
    assert result.checkpointing_reason.startswith("one GPU")
    session.clear()


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_model_on_another_gpu_is_a_clear_error(word_model, tmp_path):
    """A model loaded on GPU 1 (the current device when the run started): the run says where the
    Trainer trains instead of failing on mixed devices in the first forward."""
    session.clear()
    try:
        with torch.cuda.device(1), pytest.raises(DistributedSetupError, match="the model is on cuda:1.*cuda:0"):
            nbtune.finetune(_word_config(word_model, tmp_path / "run"), dashboard=False, progress=False,
                            reuse_model=False)
    finally:
        session.clear()
