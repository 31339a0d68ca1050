"""A step that asks for more rows than the data has: what actually happens, in one line.

The Trainer's data loader yields the training rows once per epoch in batches of ``batch_size``
per process; an optimizer step accumulates ``grad_accum`` of them, but an epoch that ends first
ends the step too. So when batch_size x grad_accum x processes exceeds the training rows, every
step trains on each row exactly once (one epoch per step), in ceil(rows / (batch_size x
processes)) micro-batches instead of grad_accum.
"""
from __future__ import annotations

import math


def oversized_batch_note(cfg, train_rows: int, world: int = 1) -> str | None:
    """One line when a step asks for more rows than ``train_rows``: what a step really holds and
    what to change; None when the data fills the asked-for steps."""
    t = cfg.train
    asked = t.batch_size * t.grad_accum * world
    if train_rows <= 0 or asked <= train_rows:
        return None
    micro = math.ceil(train_rows / (t.batch_size * world))
    per_gpu = " per GPU" if world > 1 else ""
    return (f"train.batch_size x grad_accum{' x GPUs' if world > 1 else ''} = {asked:,} rows per step, but the data "
            f"has {train_rows:,} training rows: each step trains on all {train_rows:,} rows once (one epoch per "
            f"step, {micro} micro-batch{'es' if micro > 1 else ''} of up to {min(t.batch_size, train_rows):,} "
            f"rows{per_gpu} instead of {t.grad_accum}); lower train.batch_size / train.grad_accum for more steps "
            "per epoch")

