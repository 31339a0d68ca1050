"""Host time of the trainer's batches: fetch + collate, packed (padding-free) and padded.

    python benchmarks/trainer_collate_time.py [--batches 30] [--repeat 5]

Builds ``nbtune.finetune``'s trainer as benchmarks/trainer_host_profile.py does (SmolLM2's
tokenizer, GSM8K conversations, a 1-layer random Llama: the model is never run) and, instead of
training, times on the CPU, per batch:

- ``fetch``: the dataset's rows of one batch (``__getitems__``: Arrow to Python lists);
- ``collate``: the trainer's data collator alone (TRL's, or nbtune's wrapper of it), and with the
  host attention plan (what the dataloader calls);
- ``dataloader``: ``next()`` on the trainer's own (accelerate-prepared) dataloader, all of it.

Rows: ``packed``: batch 2 x 2048 with ``data.packing: true``; ``padded``: batch 2 x 256. Each figure
is the best of ``--repeat`` timings (``collate``: over the same rows each time).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "peers")]


class _Timed(Exception):
    """Raised out of the training loop once the batches were timed."""


def time_batches(trainer, batches: int, repeat: int) -> dict:
    ds, collator = trainer.train_dataset, trainer.data_collator
    inner = getattr(collator, "collator", collator)  # the collator the host plan wraps
    rows = ds.__getitems__(list(range(trainer.args.per_device_train_batch_size)))

    def best(fn, number=20):
        fn()
        return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e3

    out = {"collator": type(inner).__name__, "fetch_ms": best(lambda: ds.__getitems__(list(range(len(rows))))),
           "collate_ms": best(lambda: inner(rows)), "collate_plan_ms": best(lambda: collator(rows))}
    dataloader = trainer.get_train_dataloader()

    def epochs():  # the rows run out before the timings do: start the next epoch (rarely, in the timing)
        while True:
            yield from dataloader

    loader = epochs()
    for _ in range(3):
        next(loader)
    walls = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(loader)
        walls.append((time.perf_counter() - t0) / batches * 1e3)
    out["dataloader_ms"] = min(walls)
    out["tokens"] = int(batch["input_ids"].numel())
    return out


def measure(packing: bool, batches: int, repeat: int, assets: str | None) -> dict:
    import transformers

    import nbtune
    from trainer_data import resolve_assets, write_data
    from trainer_host_profile import tiny_checkpoint
    from trainer_nbtune import finetune_config

    work = tempfile.mkdtemp(prefix="nbtune-collate-")
    tokenizer_dir, gsm8k = resolve_assets(assets)
    data = write_data(work, tokenizer_dir, gsm8k, text_rows=2, text_lo=64, text_hi=128, chat_rows=1024)
    model = tiny_checkpoint(os.path.join(work, "model"), tokenizer_dir, 1)
    seq = 2048 if packing else 256
    run = argparse.Namespace(model=model, data=data["gsm8k"]["path"], seq=seq, batch=2, packing=packing,
                             dtype="float32", warmup=1, steps=1, out=os.path.join(work, "out"))
    found = {}

    def timed_instead_of_training(trainer, *args, **kwargs):
        found.update(time_batches(trainer, batches, repeat))
        raise _Timed

    real = transformers.Trainer._inner_training_loop
    transformers.Trainer._inner_training_loop = timed_instead_of_training
    try:
        nbtune.finetune(finetune_config(run, "messages"), dashboard=False, progress=False)
    except _Timed:
        pass
    finally:
        transformers.Trainer._inner_training_loop = real
    return dict(found, row=f"{'packed' if packing else 'padded'} 2 x {seq}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--assets", default="", help="as benchmarks/trainer.py --assets")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    results = [measure(packing, args.batches, args.repeat, args.assets or None) for packing in (True, False)]
    print("| row | tokens | collator | fetch ms | collate ms | + host plan ms | dataloader ms per batch |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['tokens']} | {r['collator']} | {r['fetch_ms']:.2f} | {r['collate_ms']:.2f} | "
              f"{r['collate_plan_ms']:.2f} | {r['dataloader_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
