"""nbtune's trainer: TRL's SFTTrainer with nbtune's behaviour, and the training arguments of a run.

What every nbtune trainer does (:class:`RunTrainer`, shared with the DPO / ORPO trainers of
:mod:`nbtune.train.preference` and the GRPO trainer of :mod:`nbtune.train.grpo`), each piece in its
own mixin module:

- one GPU per process, never ``nn.DataParallel`` (distributed.py);
- LoRA weights kept fp32 (TRL casts a 4-/8-bit model's trainable parameters to bf16, which would
  put bf16 gradients under an fp16 run's loss scaler);
- the patched model's attention plans built by the collator on the host (host_plan.py);
- bitsandbytes' optimizers stepping without a device sync per parameter, embedding overrides
  registered (optimizer.py);
- checkpoints written under a temporary name and renamed, ``keep_checkpoints`` of them kept, each
  marked with why it was saved: a schedule, an interrupt, the autosave clock (checkpoint.py);
- step losses and gradient norms judged by the NaN/inf guard (stability.py).

The trainers whose batches are token rows (SFT, DPO, ORPO) keep the count of tokens seen on the
device between logging steps (token_count.py) and take the parameter count for FLOPs once
(flops.py). The SFT trainer adds the patched model's own fused loss (fused_loss.py), gradients cleared and
clipped over the trainable parameters only (trainable.py) and the padding-free collator built with
numpy (padding_free.py). The run's controls (``keep_checkpoints``, ``interrupt``, ``autosave``,
``guard``) are constructor arguments; the ones that are callbacks join the trainer's callbacks.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from . import distributed
from .checkpoint import AutoSave, InterruptCallback, StagedCheckpoints, checkpoints_dir
from .config import Config
from .flops import ParameterCountOnce
from .fused_loss import PatchedModelLoss
from .host_plan import HostPlannedCollator
from .optimizer import register_embedding_overrides, sync_free
from .padding_free import fast_padding_free
from .stability import NonFiniteGuard, RecordsStepLoss
from .token_count import TokensSeenOnDevice
from .trainable import TrainableOnly

OPTIMIZERS = {"adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit", "adamw": "adamw_torch",
              "sgd": "sgd"}


def optimizer_name(cfg: Config, device: torch.device) -> str:
    """transformers' name of ``train.optimizer``; bitsandbytes' 8-bit ones need a GPU (else AdamW)."""
    name = OPTIMIZERS[cfg.train.optimizer]
    if "8bit" in name and device.type != "cuda":
        return "adamw_torch"
    return name


def sft_args(cfg: Config, out: Path, model, has_eval: bool):
    """TRL's SFTConfig for this run. With ``data.packing`` every train entry is a whole packed
    micro-batch (nbtune packed it: TRL's own packing stays off, its preparation of the already
    tokenized data is skipped) and the per-device batch is that one entry."""
    from trl import SFTConfig

    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), torch.float32)
    t = cfg.train
    return SFTConfig(
        output_dir=str(checkpoints_dir(out)),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs or 1.0,
        per_device_train_batch_size=1 if cfg.data.packing else t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        optim=optimizer_name(cfg, device),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        report_to="none",
        disable_tqdm=True,
        max_length=cfg.model.max_seq_length,
        packing=False,  # data.packing: packed by nbtune (packing.py)
        dataset_kwargs={"skip_prepare_dataset": True} if cfg.data.packing else None,
        fp16=device.type == "cuda" and dtype == torch.float16,
        bf16=device.type == "cuda" and dtype == torch.bfloat16,
        use_cpu=device.type != "cuda",
        dataloader_pin_memory=device.type == "cuda",
        # the batches (pinned) go to the GPU with non-blocking copies: a blocking copy waits for the
        # device, three times per micro-batch (input ids, labels, mask)
        accelerator_config={"non_blocking": device.type == "cuda"},
        gradient_checkpointing=False,  # set up by nbtune.add_lora
        include_num_input_tokens_seen="non_padding",  # counted on the device, read when logging
        # transformers' filter tests every micro-batch's loss with a Python `or` of two tensors: a device
        # sync per micro-batch. nbtune's NonFiniteGuard (stability.py) judges the loss and the gradients
        # once per optimizer step and skips bad steps; a non-finite loss is logged as what it is.
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        dataset_num_proc=None,
        # DDP (a torchrun / accelerate launch): every LoRA weight is used in every forward, so DDP need
        # not search the graph for unused ones (that search also breaks with checkpointing); no buffer
        # changes during training, so none is broadcast before each forward
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,
    )


@contextlib.contextmanager
def checkpointing_switch_off(trainer_module: str):
    """TRL's DPO and GRPO trainers turn gradient checkpointing off around their no-grad passes
    (the reference forward, the log-probs of generated completions) and back on with transformers'
    checkpoint function, which would drop nbtune's offloaded / plain checkpointing for the rest of
    the run. Inside this, ``trl.trainer.<trainer_module>.disable_gradient_checkpointing`` (e.g.
    ``"dpo_trainer"``) does nothing (passes without gradients save no activations anyway)."""
    import importlib

    trl_module = importlib.import_module(f"trl.trainer.{trainer_module}")
    switch = trl_module.disable_gradient_checkpointing
    trl_module.disable_gradient_checkpointing = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        yield
    finally:
        trl_module.disable_gradient_checkpointing = switch


class RunTrainer(StagedCheckpoints, RecordsStepLoss):
    """Trainer mixin (before TRL's trainer in the bases): what every nbtune trainer does (module
    docstring). Keyword arguments beside the trainer's own: ``keep_checkpoints`` (complete
    checkpoints kept), ``interrupt`` (the run's :class:`InterruptCallback`: checkpoints saved on an
    interrupt say so), ``autosave`` (:class:`AutoSave`) and ``guard`` (:class:`NonFiniteGuard`);
    the last three also join the callbacks, after the ones given."""

    def __init__(self, *args, keep_checkpoints: int = 2, interrupt: InterruptCallback | None = None,
                 autosave: AutoSave | None = None, guard: NonFiniteGuard | None = None, **kwargs):
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from ..models.lora import trainable_to_fp32

        self.nbtune_keep_checkpoints = keep_checkpoints
        self.nbtune_interrupt, self.nbtune_autosave, self.nbtune_guard = interrupt, autosave, guard
        controls = [c for c in (interrupt, autosave, guard) if c is not None]
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or ()), *controls]
        distributed.one_gpu_per_process(kwargs.get("args"), kwargs.get("model"))
        super().__init__(*args, **kwargs)
        for noisy in (PrinterCallback, ProgressCallback):  # nbtune's own views show the metrics
            self.remove_callback(noisy)
        trainable_to_fp32(self.model)
        self.data_collator = self.nbtune_collator(self.data_collator)

    def nbtune_collator(self, collator):
        """The collator as this trainer uses it: a patched model's batches carry the attention plan
        built on the host (host_plan.py)."""
        from ..models.patches import is_patched
        from ..models.patches.gemma3 import text_only_check

        if is_patched(self.accelerator.unwrap_model(self.model)):
            return HostPlannedCollator(collator, text_only_check(self.model))
        return collator

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """transformers' choice, with bitsandbytes' optimizers stepping without a device
        synchronization per parameter (nbtune/train/optimizer.py)."""
        from transformers import Trainer

        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        return sync_free(cls), kwargs

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        register_embedding_overrides(self.model, optimizer)
        return optimizer


@functools.cache
def sft_trainer_class():
    """nbtune's SFT trainer class (TRL is imported on the first call)."""
    from trl import SFTTrainer

    class NbtuneSFTTrainer(ParameterCountOnce, TokensSeenOnDevice, PatchedModelLoss, RunTrainer, TrainableOnly,
                           SFTTrainer):
        """TRL's SFTTrainer with nbtune's behaviour (nbtune/train/trainer.py): the patched model's
        fused loss, gradients over the trainable parameters only, padding-free rows collated with
        numpy (packed ones inside nbtune's packer)."""

        def nbtune_collator(self, collator):
            if hasattr(collator, "packed"):  # data.packing: nbtune's packer, padding-free inside
                collator.packed = fast_padding_free(collator.packed)
            else:
                collator = fast_padding_free(collator)  # TRL's padding-free rows, with numpy
            return super().nbtune_collator(collator)

    return NbtuneSFTTrainer
