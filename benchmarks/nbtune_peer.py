"""Peer: nbtune on the same random-weight checkpoints and the same loop as peers/hf_qlora_baseline.py.

    python benchmarks/nbtune_peer.py llama3-8b:2:2048:bfloat16 [shape:batch:seq:dtype ...]

One JSON line per config, in the peers' format, with ``peer="nbtune-<version>"``. The loop is the
peers' loop: 3 warm-up + 8 timed steps (WARMUP / STEPS override, as in unsloth_peer.py), median
step time, tokens/s = batch x seq / median, ``torch.cuda.max_memory_reserved()`` from after the
optimizer is made; random tokens from a CUDA generator seeded 1, one ``randint`` per step, labels =
inputs; AdamW 8-bit (bitsandbytes' kernels and states, stepped as nbtune's trainer steps it: without
bitsandbytes' device synchronization after every parameter, one update call per bucket chunk of
parameters instead of one per parameter, same bits; nbtune/train/optimizer.py), lr 2e-4; LoRA r=16, alpha=16, dropout 0 on the seven
projections; NF4 double-quant 4-bit through nbtune's public API only::

    model, tok = nbtune.load_model(path, max_seq_length=seq, load_in_4bit=True, dtype=dtype)
    model = nbtune.add_lora(model, r=16, alpha=16, dropout=0.0, targets=[...], gradient_checkpointing="offload")

Gradient checkpointing is asserted twice: structurally (train mode, ``is_gradient_checkpointing``,
checkpointed decoder layers) and at run time (the layers' checkpoint function is called during
the first step's forward; NBTUNE_BENCH_GC_CHECK=structural skips the run-time count).

Environment: CKPT_ROOT (/tmp/ckpt), NBTUNE_BENCH_GC (checkpointing mode, default ``offload``; ``auto``:
what ``nbtune.finetune`` would choose here, see ``checkpointing_for``), MEM_CAP_GIB (T4 emulation: allocator cap, set after the
checkpoint is built), NBTUNE_BENCH_SDPA (e.g. ``efficient``: the only SDPA backend allowed).

The random checkpoints say max_position_embeddings=8192 (as the peers build them) and
``nbtune.load_model`` refuses a longer max_seq_length; Unsloth instead stretches RoPE linearly.
For seq > the checkpoint's limit this script loads a view of the checkpoint (symlinked weights,
config with max_position_embeddings = seq), which leaves the computation unchanged for the
default RoPE, and says so in the line (``ctx_view_from``).
"""
import gc
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "peers"))
from bench_common import (  # noqa: E402
    LORA_TARGETS, SHAPES, HostMemory, apply_mem_cap, apply_sdpa_backend_from_env, build_checkpoint,
    ensure_tokenizer, mem_cap_gib, sdpa_backend_from_env,
)

apply_sdpa_backend_from_env()  # before transformers / nbtune are imported

import torch  # noqa: E402

TOKEN_SEED = 1  # the peers' torch.Generator(device="cuda").manual_seed(1)


def token_generator(device="cuda") -> torch.Generator:
    """The peers' generator: ``torch.Generator(device="cuda").manual_seed(1)``."""
    return torch.Generator(device=device).manual_seed(TOKEN_SEED)


def draw_tokens(g: torch.Generator, vocab_size: int, batch: int, seqlen: int, device="cuda") -> torch.Tensor:
    """One step's batch, drawn exactly as the peers draw it (one randint per step, in step order)."""
    return torch.randint(0, vocab_size, (batch, seqlen), device=device, generator=g)


def nbtune_version() -> str:
    import nbtune

    return getattr(nbtune, "__version__", "unknown")


def checkpoint_for_context(path: str, seqlen: int):
    """``(path, None)`` if the checkpoint admits ``seqlen`` tokens, else ``(view, limit)``: a
    sibling folder whose files link to the checkpoint's, with max_position_embeddings = seqlen."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    limit = cfg.get("max_position_embeddings")
    if not limit or seqlen <= limit:
        return path, None
    view = f"{path.rstrip('/')}@ctx{seqlen}"
    os.makedirs(view, exist_ok=True)
    for name in os.listdir(path):
        if name == "config.json":
            continue
        link = os.path.join(view, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(os.path.abspath(path), name), link)
    cfg["max_position_embeddings"] = seqlen
    with open(os.path.join(view, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return view, limit


def checkpointed_layers(model) -> list:
    """Decoder layers that will recompute in backward (transformers' GradientCheckpointingLayer rule)."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [m for m in base.modules()
            if getattr(m, "gradient_checkpointing", False) is True and hasattr(m, "_gradient_checkpointing_func")
            and not isinstance(m, PreTrainedModel)]  # the layers, not the model's own flag


def assert_checkpointing(model) -> int:
    """Gradient checkpointing is on and will run: train mode, the model's flag, checkpointed layers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert model.training and base.training, "model is not in train mode: HF layers only checkpoint while training"
    assert getattr(base, "is_gradient_checkpointing", False), "gradient checkpointing is not enabled"
    layers = checkpointed_layers(model)
    assert layers, "no module will checkpoint (no gradient_checkpointing=True layer)"
    return len(layers)


class CheckpointCallCounter:
    """Counts calls of the layers' checkpoint function while active (the first step), then restores it."""

    def __init__(self, model):
        self.layers = checkpointed_layers(model)
        self.calls = 0
        self.saved = []

    def __enter__(self):
        for layer in self.layers:
            original = layer.__dict__.get("_gradient_checkpointing_func", None)
            func = layer._gradient_checkpointing_func

            def counted(*args, _func=func, **kwargs):
                self.calls += 1
                return _func(*args, **kwargs)

            self.saved.append((layer, original))
            layer._gradient_checkpointing_func = counted
        return self

    def __exit__(self, *exc):
        for layer, original in self.saved:
            if original is None:
                del layer._gradient_checkpointing_func
            else:
                layer._gradient_checkpointing_func = original
        self.saved.clear()
        return False


def loop_config(load_path: str, batch: int, seqlen: int, dtype, checkpointing: str) -> dict:
    """This loop as an nbtune config (4-bit base, LoRA r16 on LORA_TARGETS, no gradient accumulation),
    for the planner."""
    return {"model": {"name": load_path, "max_seq_length": seqlen, "load_in_4bit": True,
                      "dtype": str(dtype).split(".")[-1]},
            "lora": {"r": 16, "alpha": 16, "targets": list(LORA_TARGETS)},
            "train": {"batch_size": batch, "grad_accum": 1, "gradient_checkpointing": checkpointing}}


def checkpointing_for(load_path: str, batch: int, seqlen: int, dtype) -> tuple[str, int | None, str]:
    """(mode, offloaded layers or None for all, why) from NBTUNE_BENCH_GC (default ``offload``). ``auto``:
    what ``gradient_checkpointing: auto`` takes in ``nbtune.finetune`` for this run on this machine
    (``nbtune.planner.choose_checkpointing``: offload as many layers as this host's RAM holds, a memory
    cgroup's limit included, the rest checkpointed on the GPU), as the T4 rows under a host cap need."""
    mode = os.environ.get("NBTUNE_BENCH_GC", "offload")
    if mode != "auto":
        return mode, None, "NBTUNE_BENCH_GC"
    from nbtune.planner import choose_checkpointing

    cfg = loop_config(load_path, batch, seqlen, dtype, "auto")
    # this GPU with this host's RAM (a cgroup's limit included); this loop holds no dataset
    choice = choose_checkpointing(cfg, gpu="auto", data_rows=0)
    return choice.mode, choice.offload_layers, choice.reason


def plan_fields(load_path: str, batch: int, seqlen: int, dtype, mode: str, offload_layers: int | None) -> dict:
    """What the planner predicts for this loop on this machine (GPU reserved peak and host RAM, with
    the terms: the calibration points of benchmarks/calibrate.py and of the host model), or why not."""
    from nbtune.planner import plan_from_config

    cfg = loop_config(load_path, batch, seqlen, dtype, mode)
    try:
        p = plan_from_config(cfg, gpu="auto", data_rows=0, offload_layers=offload_layers)
    except Exception as exc:  # noqa: BLE001 - a figure the row goes without; the run itself is unaffected
        return dict(plan_error=f"{type(exc).__name__}: {exc}"[:300])
    return dict(plan_reserved_gib=round(p.reserved_gib, 3), plan_host_peak_gib=round(p.host_process_peak_gib, 3),
                plan_host_terms={k: round(v, 3) for k, v in p.host_breakdown.items()})


def run(shape, path, batch, seqlen, dtype, steps=int(os.environ.get("STEPS", 8)),
        warmup=int(os.environ.get("WARMUP", 3)), rank=16):
    import bitsandbytes as bnb
    import nbtune
    from nbtune.train.optimizer import sync_free

    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    host = HostMemory()
    host.begin()
    load_path, ctx_view_from = checkpoint_for_context(path, seqlen)
    t0 = time.time()
    model, tok = nbtune.load_model(load_path, max_seq_length=seqlen, load_in_4bit=True, dtype=dtype)
    gc_mode, offload_layers, gc_reason = checkpointing_for(load_path, batch, seqlen, dtype)
    model = nbtune.add_lora(model, r=rank, alpha=rank, dropout=0.0, targets=list(LORA_TARGETS),
                            gradient_checkpointing=gc_mode, offload_layers=offload_layers)
    load_s = time.time() - t0
    model.train()
    gc_layers = assert_checkpointing(model)
    opt = sync_free(bnb.optim.AdamW8bit)([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    after_load = torch.cuda.memory_allocated()
    host.training()
    torch.cuda.reset_peak_memory_stats()
    V = model.config.vocab_size
    g = token_generator("cuda")
    check_calls = os.environ.get("NBTUNE_BENCH_GC_CHECK", "run").lower() != "structural"
    times, losses, gc_calls = [], [], None
    for i in range(warmup + steps):
        ids = draw_tokens(g, V, batch, seqlen, "cuda")
        torch.cuda.synchronize(); t = time.time()
        if i == 0 and check_calls:
            with CheckpointCallCounter(model) as counter:
                out = model(input_ids=ids, labels=ids)
            gc_calls = counter.calls
            assert gc_calls > 0, "gradient checkpointing is not active: no layer called its checkpoint function"
        else:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup: times.append(time.time() - t)
        losses.append(out.loss.item())
    med = sorted(times)[len(times) // 2]
    host.end()
    res = dict(peer=f"nbtune-{nbtune_version()}", shape=shape, batch=batch, seqlen=seqlen,
               dtype=str(dtype).split(".")[-1], rank=rank, load_s=round(load_s, 1), step_s_median=round(med, 3),
               tokens_per_s=round(batch * seqlen / med), after_load_gib=round(after_load / 2**30, 2),
               peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
               first_loss=round(losses[0], 3), last_loss=round(losses[-1], 3),
               first_loss_exact=losses[0], cap_gib=mem_cap_gib(),
               gc_mode=gc_mode, offload_layers=offload_layers, gc_reason=gc_reason, gc_layers=gc_layers,
               gc_calls_first_step=gc_calls,
               warmup=warmup, steps=steps, sdpa=sdpa_backend_from_env() or "default",
               **host.fields, **plan_fields(load_path, batch, seqlen, dtype, gc_mode, offload_layers))
    if ctx_view_from:
        res["ctx_view_from"] = ctx_view_from
    print(json.dumps(res), flush=True)
    del model, opt, out; gc.collect(); torch.cuda.empty_cache()
    return res


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def main(argv):
    root = os.environ.get("CKPT_ROOT", "/tmp/ckpt")
    cap = mem_cap_gib()
    for shape, b, s, dt in [a.split(":") for a in argv]:
        p = f"{root}/{shape}"
        build_checkpoint(shape, p)
        ensure_tokenizer(p, SHAPES[shape]["vocab_size"])
        apply_mem_cap(cap)  # emulate a smaller GPU, after the checkpoint is built
        try:
            run(shape, p, int(b), int(s), getattr(torch, dt))
        except Exception as exc:  # noqa: BLE001 - only OOM becomes a line; anything else is a failure
            if not is_oom(exc):
                raise
            print(json.dumps(dict(peer=f"nbtune-{nbtune_version()}", shape=shape, batch=int(b), seqlen=int(s),
                                  dtype=dt, cap_gib=cap, error="OOM", detail=str(exc).splitlines()[0][:300])),
                  flush=True)
            del exc
            gc.collect(); torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
