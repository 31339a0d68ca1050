"""Data-parallel runs: the same config on several GPUs through torch's DDP, launched by a standard
launcher (``torchrun``, ``accelerate launch``, or accelerate's ``notebook_launcher`` behind
``%%finetune --gpus N``), never by nbtune itself.

What each process (a *rank*) does: it reads its place from the launcher's environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), makes ``cuda:LOCAL_RANK`` its device before anything
touches CUDA, loads its own copy of the (4-bit) base model there and adds the same LoRA weights
(same seed). transformers' Trainer, through accelerate, then wraps the model in DDP (LoRA gradients
are all-reduced in buckets while the backward runs) and shards the data: every global batch is
cut into ``WORLD_SIZE`` disjoint per-device batches. Only rank 0 writes: the metrics stream, the
progress lines, the dashboard, ``run.yaml``, checkpoints' finishing touches and the adapter; every
rank still reaches every collective call (evaluation, checkpoint barriers, the end-of-run check),
so none waits forever for another.

Batch arithmetic: ``train.batch_size`` is per GPU (the planner's memory figures are per GPU too);
one optimizer step sees ``batch_size x grad_accum x world_size`` rows, the *global batch*. The
same config on 1 GPU and on 2 GPUs with ``grad_accum`` halved sees the same rows at every step.

At the end of a distributed run every rank hashes its LoRA weights; rank 0 records whether the
replicas agree (they must, bit for bit: DDP applies the same averaged gradient everywhere).

Without a launcher a run is one process on one GPU, however many the machine shows
(:func:`one_gpu_per_process`: transformers would otherwise use ``nn.DataParallel``).
"""
from __future__ import annotations

import hashlib
import os
import warnings

ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class DistributedSetupError(RuntimeError):
    """The launcher's environment cannot be used (a missing or malformed variable, no GPU for a rank)."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={value!r} is not an integer "
                                    "(it is set by torchrun / accelerate launch)") from None
    if n < 0:
        raise DistributedSetupError(f"environment variable {name}={value!r} is negative")
    return n


def world_size() -> int:
    """How many processes train together (1 outside a launcher)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank (0 outside a launcher)."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine: the index of its GPU."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes logs, checkpoints' extras and the adapter."""
    return rank() == 0


def check_environment() -> None:
    """A clear error for a launcher environment that does not add up."""
    world = world_size()
    if world > 1 and "RANK" not in os.environ:
        raise DistributedSetupError(f"WORLD_SIZE={world} but RANK is not set: start the run with torchrun or "
                                    "accelerate launch, which set both")
    if rank() >= world:
        raise DistributedSetupError(f"RANK={rank()} is not below WORLD_SIZE={world}")


def device():
    """The device of this rank: ``cuda:LOCAL_RANK`` where there is a GPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() if is_distributed() else torch.cuda.current_device())
    return torch.device("cpu")


def setup_device() -> None:
    """Make ``cuda:LOCAL_RANK`` this process's current device, before anything is loaded, so that
    the model, the planner's memory check and the metrics all use this rank's GPU (not GPU 0)."""
    import torch

    check_environment()
    if is_distributed():
        # nbtune asks DDP for broadcast_buffers=False on purpose (no buffer changes while LoRA trains);
        # torch's newer spelling is not reachable through transformers' TrainingArguments
        warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)
    if not torch.cuda.is_available() or not is_distributed():
        return
    count = torch.cuda.device_count()
    if local_rank() >= count:
        raise DistributedSetupError(
            f"LOCAL_RANK={local_rank()} has no GPU: this machine shows {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {count} "
            "processes per machine (torchrun --nproc_per_node, accelerate launch --num_processes)")
    torch.cuda.set_device(local_rank())


def one_gpu_per_process(args, model=None) -> None:
    """A run outside a launcher trains on one GPU, however many this process sees.

    transformers' ``TrainingArguments``, in a process no launcher started, counts every visible GPU
    (``_setup_devices``: ``n_gpu = torch.cuda.device_count()``, device ``cuda:0``), and its Trainer
    then wraps the model in ``nn.DataParallel``, which TRL's SFTTrainer refuses ("does not support
    `nn.DataParallel`") and which nbtune's 4-bit kernels would not run under anyway. nbtune runs one
    process per GPU: in-process on one GPU, data parallel under a launcher (``%%finetune --gpus N``,
    torchrun, accelerate launch), where ``n_gpu`` is 1 already. The arguments have no public
    setting for it (``n_gpu`` is a read-only property over the private ``_n_gpu``), so this sets
    ``_n_gpu`` to 1, as the Trainer itself does for a model placed with ``device_map``. It stays 1:
    ``_setup_devices`` is a cached property that ``TrainingArguments.__post_init__`` has already run.

    ``model``: the model to train; on a GPU other than the arguments' device (outside a launcher
    that is ``cuda:0``, the first visible GPU) it is a :class:`DistributedSetupError` here, not a
    device mismatch in the first forward."""
    if args is None:
        return
    if args.n_gpu > 1:
        args._n_gpu = 1
    device = next((p.device for p in model.parameters()), None) if model is not None else None
    if device is not None and device.type == "cuda" and device != args.device:
        raise DistributedSetupError(
            f"the model is on {device}, but outside a launcher transformers' Trainer trains on {args.device} (the "
            "first visible GPU): load it there, choose the GPU with CUDA_VISIBLE_DEVICES before CUDA starts, or "
            "train on several GPUs with %%finetune --gpus N / torchrun / accelerate launch")


def global_batch(cfg, world: int | None = None) -> int:
    """Rows per optimizer step across all ranks: batch_size x grad_accum x world size."""
    world = world_size() if world is None else world
    return cfg.train.batch_size * cfg.train.grad_accum * world


def batch_description(cfg, world: int | None = None) -> str:
    """'16 rows (batch 2 x grad_accum 4 x 2 GPUs)'; without the GPU factor on one process."""
    world = world_size() if world is None else world
    t = cfg.train
    parts = f"batch {t.batch_size} x grad_accum {t.grad_accum}" + (f" x {world} GPUs" if world > 1 else "")
    return f"{global_batch(cfg, world)} rows ({parts})"


# ---------------------------------------------------------------------------- collectives
def _initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (nothing outside a distributed run)."""
    if not _initialized():
        return
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        import torch

        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_(tensor, op: str):
    """``tensor`` reduced in place over the ranks with ``op`` ("min", "max", "sum"); unchanged outside
    a distributed run. All ranks must call it together, with the tensor on the backend's device."""
    if _initialized():
        import torch.distributed as dist

        dist.all_reduce(tensor, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return tensor


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank (all ranks must call it together)."""
    if not _initialized():
        return bool(flag)
    import torch

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    return bool(all_reduce_(t, "max").item())


def trainable_digest(model) -> str:
    """SHA-256 of the trainable parameters (name-sorted, exact bytes): equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def rank_reports(model) -> list[dict]:
    """Every rank's LoRA-weights digest (:func:`trainable_digest`), device and peak reserved GPU
    memory (GiB, None on a CPU), in rank order; all ranks must call it together."""
    import torch

    dev = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))
    mine = dict(digest=trainable_digest(model), device=str(dev),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved(dev) / 2**30, 3) if dev.type == "cuda" else None)
    if not _initialized():
        return [mine]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
