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
from .packing import packing_line


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
        if self.config.train.method == "grpo":  # rewards, not losses (grpo_lines says why)
            lines += grpo_lines(self.log_path)
        else:
            if self.eval_loss_before is not None and self.eval_loss_after is not None:
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
            lines.append(packing_line(self.packing))
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


def _read(log_path) -> list[dict]:
    try:
        with open(log_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _mean(values) -> float:
    return sum(values) / len(values)


def grpo_lines(log_path) -> list[str]:
    """A GRPO run's summary lines, from its log: the held-out prompts' mean reward at the first and
    last evaluation, and the mean reward (each reward function's too) and completion length of the
    train steps, over the first and the last tenth of the steps (a step's mean covers a handful of
    prompts: one step alone is noisy). No loss lines: GRPO's loss is the advantage-weighted
    surrogate (plus beta x KL); a group's advantages sum to 0, so it stays near 0 whether or not
    the rewards rise, and its eval loss is the same surrogate on the held-out completions."""
    records = _read(log_path)
    lines = []
    held = [r["eval_reward"] for r in records if r.get("event") == "eval" and r.get("eval_reward") is not None]
    if len(held) >= 2:
        lines.append(f"held-out mean reward: {held[0]:.3f} before -> {held[-1]:.3f} after")
    train = [r for r in records if r.get("event") == "train" and r.get("reward") is not None]
    if not train:
        return lines
    k = -(-len(train) // 10)
    first, last = train[:k], train[-k:]
    span = (f"step {first[0]['step']}" if k == 1 else f"steps {first[0]['step']}-{first[-1]['step']}",
            f"step {last[0]['step']}" if k == 1 else f"steps {last[0]['step']}-{last[-1]['step']}")
    def change(key, digits=3) -> str | None:
        values = [[r[key] for r in part if r.get(key) is not None] for part in (first, last)]
        return f"{_mean(values[0]):.{digits}f} -> {_mean(values[1]):.{digits}f}" if all(values) else None

    names = [key for key in train[0] if key.startswith("rewards/") and change(key)]
    each = ", ".join(f"{key[len('rewards/'):]} {change(key)}" for key in names)
    lines.append(f"train mean reward: {_mean([r['reward'] for r in first]):.3f} ({span[0]}) -> "
                 f"{_mean([r['reward'] for r in last]):.3f} ({span[1]})" + (f"; {each}" if len(names) > 1 else ""))
    if change("completion_length"):
        lines.append(f"completion length (mean tokens): {change('completion_length', 1)}")
    return lines
