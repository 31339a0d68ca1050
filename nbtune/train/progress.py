"""A live one-line-per-log progress view for terminals and logs (the notebook view is the dashboard).

A record's non-finite numbers arrive as None (the metrics stream writes JSON, which has no NaN):
a step whose loss was NaN/inf prints ``loss nan/inf (skipped)`` and the lines go on.
"""
from __future__ import annotations

import sys


def _fmt_secs(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 60}:{s % 60:02d}"


def _num(value, spec: str, missing: str) -> str:
    """``value`` formatted with ``spec``; ``missing`` for None (a NaN/inf the stream wrote as null)."""
    return missing if value is None else format(value, spec)


class TerminalProgress:
    """Listener for MetricsStream: prints step, loss, lr, tokens/s, memory and ETA (a GRPO run: its
    mean reward too, and the held-out mean reward in place of the held-out loss)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def __call__(self, rec: dict) -> None:
        event = rec.get("event")
        if event == "start":
            resumed = f", resuming from step {rec['resumed_from']}" if rec.get("resumed_from") else ""
            world = rec.get("world_size") or 1
            parallel = f" on {world} processes, global batch {rec.get('global_batch')} rows" if world > 1 else ""
            self._print(f"training: {rec.get('max_steps')} steps{parallel}{resumed}")
            return
        if event == "distributed":
            verdict = ("identical on every rank" if rec.get("replicas_identical")
                       else "DIFFERENT between ranks (the replicas drifted apart)")
            self._print(f"data parallel: LoRA weights {verdict} ({rec.get('world_size')} ranks)")
            return
        if event == "end":
            peak = f", peak VRAM {rec['vram_peak_gib']:.2f} GiB" if "vram_peak_gib" in rec else ""
            self._print(f"training done at step {rec.get('step')}{peak}")
            return
        if event in ("summary", "skipped", "diverged"):  # said better by the summary / the run's own notes
            return
        if event == "interrupted":
            self._print(f"interrupted at step {rec.get('step')}/{rec.get('max_steps')}; checkpoint: "
                        f"{rec.get('checkpoint')} (resume to continue)")
            return
        if event == "eval" and not rec.get("max_steps") and "eval_reward" in rec:  # grpo: its eval loss says little
            self._print("held-out mean reward before training: " + _num(rec["eval_reward"], ".3f", "nan/inf"))
            return
        if event == "eval" and not rec.get("max_steps") and "eval_loss" in rec:
            self._print("held-out loss before training: " + _num(rec["eval_loss"], ".4f", "nan/inf"))
            return
        parts = [f"step {rec.get('step')}/{rec.get('max_steps')}"]
        if "loss" in rec:
            parts.append("loss " + _num(rec["loss"], ".4f", "nan/inf (skipped)"))
        if "reward" in rec:
            parts.append("reward " + _num(rec["reward"], ".3f", "nan/inf"))
        if "eval_reward" in rec:
            parts.append("eval_reward " + _num(rec["eval_reward"], ".3f", "nan/inf"))
        elif "eval_loss" in rec:
            parts.append("eval_loss " + _num(rec["eval_loss"], ".4f", "nan/inf"))
        if rec.get("lr") is not None:
            parts.append(f"lr {rec['lr']:.2e}")
        if "grad_norm" in rec and rec["grad_norm"] is not None:
            parts.append(f"grad_norm {rec['grad_norm']:.3f}")
        if rec.get("tokens_per_s") is not None:
            parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
        if rec.get("vram_reserved_gib") is not None:
            parts.append(f"VRAM {rec['vram_reserved_gib']:.2f} GiB")
        if "eta_s" in rec:
            parts.append(f"elapsed {_fmt_secs(rec.get('elapsed_s'))} eta {_fmt_secs(rec.get('eta_s'))}")
        self._print(" | ".join(parts))

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
