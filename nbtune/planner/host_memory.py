"""Host RAM of a fine-tune, term by term: the second budget a notebook has besides the GPU.

Free Colab gives a T4 (14.3 GiB for torch) *and* 12.7 GB of system RAM for everything: the Python
process with torch and the CUDA libraries, the dataset, the model while it loads, and what
offloaded checkpointing puts in pinned host memory. Running out of either ends the run; running out
of RAM ends the whole notebook kernel (the kernel's OOM killer, no Python error). Per training
process (a data-parallel run has ``world_size`` of them on one host), in bytes:

    process baseline       max(host_baseline_gib, the resident memory measured here)
                           (interpreter, torch + CUDA libraries, the CUDA context's host side,
                           transformers/peft/trl/bitsandbytes; TO BE CALIBRATED: calibration.json "host")
    dataset + tokenization rows * min(seq_len, tokens per row) * host_bytes_per_data_token
                           (host_dataset_default_gib when the data's size is not given)
    model loading          min(checkpoint bytes, host_load_shard_gib) + (largest tensor) * 2 bytes
      (transient)          (one shard read at a time, plus a 16-bit copy of the tensor being cast or
                           quantized, the largest one at worst: the embedding; checkpoint bytes: the
                           16-bit weights, or for a pre-quantized checkpoint its NF4 weights + 16-bit rest)
    offloaded activations  N * T * h * b   (N = offloaded layers, T = batch * seq_len: each offloaded
                           layer's input, kernels/offload.py's pinned host buffers)
    offload pool rounding  pool(N, T*h*b) - N*T*h*b: the pool carves buffers (512-byte aligned) from
                           slabs of count = max(1, SLAB_BYTES // stride) buffers, each page-locked in
                           place at exactly count * stride bytes: pool = ceil(N / count) * count * stride
    paged optimizer        P_lora * (8-bit AdamW bytes per parameter), paged_adamw_8bit only: its
                           states live in unified memory that may be paged out to the host

The loading transient comes and goes before training starts: the peak is

    baseline + max(loading, dataset + offloaded activations + pool rounding + paged optimizer)

per process, times ``world_size``. It fits when the host's budget (its RAM less what the OS and other
processes hold) minus that peak leaves at least max(HOST_FIT_MARGIN_GIB, HOST_FIT_MARGIN_FRACTION of
the budget): the kernel's page cache, allocator fragmentation and Python's own garbage need room.
Pure Python (no torch).
"""
from __future__ import annotations

import dataclasses
import math

from .memory import ADAM8_BYTES_PER_PARAM, DTYPE_BYTES, GiB, Coefficients, Settings
from .shapes import ModelShape

# The host budget's headroom: the larger of these (see the module docstring).
HOST_FIT_MARGIN_GIB = 0.5
HOST_FIT_MARGIN_FRACTION = 0.05

# The offload pool's layout (nbtune/kernels/offload.py: SLAB_BYTES, BUFFER_ALIGN); a test checks
# that these match, and that pool_bytes() is what the pool allocates.
POOL_SLAB_BYTES = 4 * 2**20
POOL_BUFFER_ALIGN = 512

# The breakdown's terms, in display order (the loading transient is not at once with the training terms).
HOST_TERMS = ("process baseline", "dataset + tokenization", "model loading (transient)", "offloaded activations",
              "offload pool rounding", "paged optimizer")
TRAINING_TERMS = ("dataset + tokenization", "offloaded activations", "offload pool rounding", "paged optimizer")


def pool_bytes(buffers: int, nbytes: int) -> int:
    """Pinned bytes the offload pool holds for ``buffers`` buffers of ``nbytes`` each (see the module
    docstring: aligned buffers carved from exactly sized slabs)."""
    if buffers <= 0 or nbytes <= 0:
        return 0
    stride = -(-int(nbytes) // POOL_BUFFER_ALIGN) * POOL_BUFFER_ALIGN
    count = max(1, POOL_SLAB_BYTES // stride)
    return math.ceil(buffers / count) * count * stride


def checkpoint_bytes(shape: ModelShape, prequantized: bool) -> float:
    """Bytes of the checkpoint on disk: 16-bit weights, or NF4 linear weights + 16-bit rest."""
    if prequantized:
        from .memory import NF4_BYTES_PER_PARAM

        rest = shape.embedding_params + shape.other_params + shape.vision_params
        return shape.linear_params * NF4_BYTES_PER_PARAM + rest * 2
    return shape.total_params * 2


@dataclasses.dataclass
class HostEstimate:
    """Bytes per term per process (HOST_TERMS order), the peak per process, and the details."""

    terms: dict
    peak_bytes: float
    details: dict


def host_estimate(shape: ModelShape, st: Settings, c: Coefficients, process_gib: float | None = None) -> HostEstimate:
    """Host RAM of one training process of ``shape`` under ``st`` (see the module docstring).
    ``process_gib``: the resident memory measured in this process, when the plan is for this machine."""
    b = DTYPE_BYTES[st.dtype]
    T = st.tokens
    L, h = shape.num_layers, shape.hidden_size
    baseline = max(c.host_baseline_gib, process_gib or 0.0) * GiB
    if st.data_rows is not None:
        per_row = min(st.seq_len, st.data_tokens_per_row or st.seq_len)
        dataset = st.data_rows * per_row * c.host_bytes_per_data_token
    else:
        per_row = None
        dataset = c.host_dataset_default_gib * GiB
    largest = max(shape.vocab_size * h, shape.largest_linear)
    loading = min(checkpoint_bytes(shape, shape.prequantized), c.host_load_shard_gib * GiB) + largest * 2
    n_off = st.offloaded_layers(L)
    per_layer = T * h * b
    offloaded = n_off * per_layer
    pool = pool_bytes(n_off, per_layer)
    paged = shape.lora_params(st.lora_rank, st.lora_targets) * ADAM8_BYTES_PER_PARAM \
        if st.optimizer == "paged_adamw_8bit" else 0.0
    terms = dict(zip(HOST_TERMS, (baseline, dataset, loading, offloaded, pool - offloaded, paged)))
    training = sum(terms[t] for t in TRAINING_TERMS)
    peak = baseline + max(loading, training)
    details = dict(offloaded_layers=n_off, bytes_per_offloaded_layer=per_layer, pool_bytes=pool,
                   data_tokens_per_row=per_row, loading_bytes=loading, training_bytes=training,
                   phase="loading" if loading > training else "training")
    return HostEstimate(terms=terms, peak_bytes=peak, details=details)


def max_offload_layers(shape: ModelShape, st: Settings, c: Coefficients, budget_gib: float, world_size: int = 1,
                       process_gib: float | None = None, margin_gib: float | None = None) -> int:
    """The most layers (0..L) whose inputs can be offloaded within a host budget of ``budget_gib``
    (for all ``world_size`` processes) with its headroom; -1 when the host cannot hold the run even
    with none offloaded."""
    margin = host_margin_gib(budget_gib) if margin_gib is None else margin_gib

    def fits(n: int) -> bool:
        est = host_estimate(shape, dataclasses.replace(st, gradient_checkpointing="offload", offload_layers=n), c,
                            process_gib)
        return world_size * est.peak_bytes / GiB <= budget_gib - margin

    if not fits(0):
        return -1
    lo, hi = 0, shape.num_layers  # fits(lo) holds; host use grows with n
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def host_margin_gib(budget_gib: float) -> float:
    """Headroom a host budget needs for a plan to count as fitting."""
    return max(HOST_FIT_MARGIN_GIB, HOST_FIT_MARGIN_FRACTION * budget_gib)
