"""What every finished run reports: the fields shared by a run in this process
(:class:`nbtune.train.run.FinetuneResult`) and a data-parallel run seen from the notebook
(:class:`nbtune.ui.launch.LaunchResult`). Light on purpose: the notebook side of a launch must not
import the training stack."""
from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

from .config import Config


@dataclasses.dataclass
class RunOutcome:
    config: Config
    output_dir: Path
    adapter_dir: Path
    log_path: Path
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_loss: float | None
    steps: int
    seconds: float

    # Subclasses add ``interrupted``, ``checkpoint``, ``resumed_from``, ``merged_dir``, ``world_size``,
    # ``global_batch``, ``replicas_identical``, ``gradient_checkpointing``, ``checkpointing_reason``,
    # ``rows_truncated`` and ``packing`` (fields of their own: their defaults differ).

    def summary(self) -> str:
        lines = [f"steps: {self.steps}/{self.config.train.max_steps or '?'} in {self.seconds:.0f} s"
                 + (f" (resumed from step {self.resumed_from})" if self.resumed_from else "")]
        rewards = _held_out_rewards(self.log_path) if self.config.train.method == "grpo" else None
        if rewards is not None:  # grpo: what the held-out prompts' completions scored (its eval loss says little)
            lines.append(f"held-out mean reward: {rewards[0]:.3f} before -> {rewards[1]:.3f} after")
        elif self.eval_loss_before is not None and self.eval_loss_after is not None:
            lines.append(f"held-out loss: {self.eval_loss_before:.4f} before -> {self.eval_loss_after:.4f} after")
        if self.train_loss is not None:
            lines.append(f"train loss (mean): {self.train_loss:.4f}")
        lines += [f"adapter: {self.adapter_dir}", f"log: {self.log_path}"]
        if self.merged_dir:
            lines.append(f"merged: {self.merged_dir}")
        if self.world_size > 1:
            agree = {True: "LoRA weights identical on every rank", False: "LoRA weights DIFFER between ranks",
                     None: "replicas not compared"}[self.replicas_identical]
            lines.append(f"data parallel: {self.world_size} processes, global batch {self.global_batch} rows; {agree}")
        if getattr(self, "packing", None):
            p = self.packing
            lines.append(f"packing: {p['documents']:,} documents in {p['micro_batches']:,} micro-batches of "
                         f"{p['batch_size']} x {p['max_seq_length']} tokens, fill {p['fill']:.1%} "
                         "(real tokens / (micro-batches x batch_size x max_seq_length))")
        if getattr(self, "rows_truncated", 0):
            lines.append(f"rows truncated: {self.rows_truncated} train rows longer than max_seq_length="
                         f"{self.config.model.max_seq_length} kept their first max_seq_length tokens")
        mode = getattr(self, "gradient_checkpointing", None)
        if mode and self.config.train.gradient_checkpointing == "auto":
            lines.append(f"gradient checkpointing: auto -> {mode} ({self.checkpointing_reason})")
        if self.interrupted:
            lines.insert(0, f"interrupted at step {self.steps}; checkpoint: {self.checkpoint} "
                            "(run again with --resume / resume=True to continue)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        rows = "".join(f"<div>{html.escape(line)}</div>" for line in self.summary().splitlines())
        color = "#9a6700" if self.interrupted else "#1a7f37"
        title = "nbtune run interrupted" if self.interrupted else "nbtune run done"
        return (f"<div style='font-family:system-ui,sans-serif;font-size:13px'>"
                f"<b style='color:{color}'>{title}</b>{rows}</div>")


def _held_out_rewards(log_path) -> tuple[float, float] | None:
    """A GRPO run's held-out mean reward at its first and last evaluation (from its log), or None."""
    try:
        with open(log_path, encoding="utf-8") as f:
            rewards = [rec.get("eval_reward") for rec in map(json.loads, filter(str.strip, f))
                       if rec.get("event") == "eval"]
    except (OSError, ValueError):
        return None
    rewards = [r for r in rewards if r is not None]
    return (rewards[0], rewards[-1]) if len(rewards) >= 2 else None
