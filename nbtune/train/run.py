"""``finetune(config)``: config -> model + LoRA -> tokenized data -> TRL SFTTrainer -> adapter on disk.

The magic, the CLI and the Python API all end here, so a run is the same whichever door it came
through. The output directory receives ``run.yaml`` (the resolved config), ``metrics.jsonl``
(the metrics stream), ``adapter/`` (peft format, safetensors, with the tokenizer) and, on request,
``merged/`` (a 16-bit checkpoint with the adapter folded in).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..models import add_lora, load_model
from .config import Config, build_config, output_dir
from .data import prepare_data
from .metrics import MetricsStream
from .progress import TerminalProgress


@dataclasses.dataclass
class FinetuneResult:
    config: Config
    output_dir: Path
    adapter_dir: Path
    log_path: Path
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_loss: float | None
    steps: int
    seconds: float
    metrics: list
    model: object = dataclasses.field(repr=False, default=None)
    tokenizer: object = dataclasses.field(repr=False, default=None)

    def summary(self) -> str:
        lines = [f"steps: {self.steps} in {self.seconds:.0f} s", f"adapter: {self.adapter_dir}", f"log: {self.log_path}"]
        if self.train_loss is not None:
            lines.insert(1, f"train loss (mean): {self.train_loss:.4f}")
        if self.eval_loss_before is not None and self.eval_loss_after is not None:
            lines.insert(1, f"held-out loss: {self.eval_loss_before:.4f} before -> {self.eval_loss_after:.4f} after")
        return "\n".join(lines)


def optimizer_name(cfg: Config, device: torch.device) -> str:
    names = {"adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit", "adamw": "adamw_torch", "sgd": "sgd"}
    name = names[cfg.train.optimizer]
    if "8bit" in name and device.type != "cuda":
        return "adamw_torch"  # bitsandbytes' 8-bit optimizers need a GPU
    return name


def sft_args(cfg: Config, out: Path, model, has_eval: bool):
    from trl import SFTConfig

    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), torch.float32)
    t = cfg.train
    return SFTConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs or 1.0,
        per_device_train_batch_size=t.batch_size,
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
        packing=cfg.data.packing,
        fp16=device.type == "cuda" and dtype == torch.float16,
        bf16=device.type == "cuda" and dtype == torch.bfloat16,
        use_cpu=device.type != "cuda",
        dataloader_pin_memory=device.type == "cuda",
        gradient_checkpointing=False,  # set up by nbtune.add_lora
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataset_num_proc=None,
    )


def finetune(config=None, *, listeners: list[Callable[[dict], None]] | None = None, model=None, tokenizer=None,
             progress: bool = True, **overrides) -> FinetuneResult:
    """Run one fine-tune. ``config``: a Config, dict, YAML text or .yaml path; kwargs override sections.

    ``model``/``tokenizer``: an already loaded (base) model to reuse instead of loading one.
    """
    from trl import SFTTrainer

    cfg = build_config(config, **overrides)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(cfg.to_yaml())
    t_start = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(cfg.model.name, max_seq_length=cfg.model.max_seq_length,
                                      load_in_4bit=cfg.model.load_in_4bit, dtype=cfg.model.dtype,
                                      trust_remote_code=cfg.model.trust_remote_code)
    data = prepare_data(cfg.data, tokenizer, cfg.model.max_seq_length)
    if data.dropped:
        print("nbtune: dropped train rows: " + ", ".join(f"{n} ({why})" for why, n in data.dropped.items()), file=sys.stderr)
    peft_model = add_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=cfg.lora.targets,
                          gradient_checkpointing=cfg.train.gradient_checkpointing, seed=cfg.train.seed)
    listeners = list(listeners or [])
    if progress:
        listeners.append(TerminalProgress())
    stream = MetricsStream(out / "metrics.jsonl", listeners)
    trainer = SFTTrainer(model=peft_model, args=sft_args(cfg, out, peft_model, data.eval is not None),
                         train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                         callbacks=[stream])
    before = after = None
    if data.eval is not None:
        before = trainer.evaluate()["eval_loss"]
    train_out = trainer.train()
    if data.eval is not None:
        after = trainer.evaluate()["eval_loss"]
    adapter_dir = out / "adapter"
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    if cfg.output.save_merged:
        save_merged(peft_model, tokenizer, out / "merged")
    result = FinetuneResult(
        config=cfg, output_dir=out, adapter_dir=adapter_dir, log_path=stream.path,
        eval_loss_before=before, eval_loss_after=after, train_loss=train_out.training_loss,
        steps=trainer.state.global_step, seconds=time.perf_counter() - t_start, metrics=stream.records,
        model=peft_model, tokenizer=tokenizer,
    )
    return result


def save_merged(peft_model, tokenizer, path: Path) -> Path:
    """Fold the adapter into a 16-bit copy of the base weights and save it as safetensors."""
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
