"""Activation checkpointing that keeps each checkpointed layer's input in pinned CPU memory.

What it saves
-------------
Plain checkpointing (``torch.utils.checkpoint``) keeps one tensor per checkpointed layer between
forward and backward: the layer's input hidden state, ``batch x seq x hidden`` elements. For
llama3-8b at 2x2048 tokens in bf16 that is 32 MiB a layer, 1 GiB for 32 layers, held on the GPU
from the end of the forward to the backward of that layer. ``offloaded_checkpoint`` copies that
input to pinned host memory while the layer's forward runs, and copies it back while the layer
*after it in backward order* is being recomputed, so the GPU holds at most a couple of hidden
states for all layers together: about ``(L - 3) x batch x seq x hidden x bytes`` less at the peak.
There is no Triton kernel here: the work is two DMA copies per layer, which the GPU's copy
engines run while the SMs compute (``compile_specs()`` returns an empty list).

How a step runs
---------------
Forward of layer i (grad enabled)::

    x_i --(side stream, non_blocking)--> pinned host buffer h_i      (overlaps layer i's compute)
    y_i = f_i(x_i)   with every tensor f_i saves replaced by a placeholder (torch's checkpoint)

Backward of layer i, given dL/dy_i::

    x_i' = h_i --(side stream)--> GPU            (usually already there: prefetched, see below)
    h_{i-1} --(side stream)--> GPU               (prefetch for the next layer in backward order)
    y_i' = f_i(x_i')  recomputed with grad enabled, RNG and autocast state as in the forward
    dL/dx_i, dL/dtheta_i = VJP of f_i at x_i' applied to dL/dy_i

The recompute is exact: x_i' has the same bits as x_i, the CPU and CUDA RNG states are restored
to what they were when the forward of layer i started (so dropout masks match), and autocast
runs with the forward's settings. The recompute runs the same kernels on the same bits as the
forward, so the gradients are those of the un-checkpointed layer.

Why torch's non-reentrant checkpoint plus saved-tensor hooks, not a new autograd.Function
----------------------------------------------------------------------------------------
``torch.utils.checkpoint.checkpoint`` stores the layer's *inputs* as saved tensors *before* it
installs its own hooks for the activations inside the layer. A
``torch.autograd.graph.saved_tensors_hooks`` context around the call therefore sees exactly
those inputs and nothing else, in the non-reentrant implementation (torch 2.13 saves them in
``_CheckpointFrame.save_inputs``, older releases through a no-op ``autograd.Function``'s
``save_for_backward``: both before its own hooks go on) and in the reentrant one (its
``save_for_backward`` of the inputs). Should a torch release stop doing so, the input simply
stays on the GPU (counted as ``not_seen`` in ``offload_stats()``, warned once). Packing the
hidden-state input into a host-buffer handle there, and unpacking it from the host, is all the
offload needs; everything else is torch's own, tested machinery:

- the non-reentrant path gives gradients to parameters captured inside ``function`` (LoRA
  weights) even when no input requires grad, works with ``torch.autograd.grad``, stops the
  recompute as soon as the tensors it needs are rebuilt, and handles tuple outputs, kwargs and
  non-tensor arguments; a hand-written ``autograd.Function`` is reentrant by nature: it loses
  parameter gradients unless some input requires grad (what HF's ``enable_input_require_grads``
  papers over) and would need the parameters discovered and threaded through by hand;
- RNG (CPU and CUDA) and autocast state are stashed and restored by torch;
- the cost over plain checkpointing is one Python pack and one unpack call per layer (tens of
  microseconds) plus two copies that run on the copy engines, hidden behind compute.
Against a reentrant Function the only extra work is that the non-reentrant forward builds the
layer's autograd graph (without storing anything in it): a few microseconds of Python per saved
tensor, well under 1% of a 7-8B layer's forward, and what buys the correctness points above.

Streams and lifetimes (CUDA)
----------------------------
- One side stream per device carries every copy, so a host buffer's device-to-host copy is
  always finished before the host-to-device copy that reads it starts.
- Forward: the side stream waits for the compute stream (x_i is ready), copies x_i into the
  pinned buffer and records an event. The GPU tensor x_i is not freed right away: the last
  ``DEVICE_WINDOW`` offloaded inputs keep their GPU tensor; when a newer one arrives, the compute
  stream waits on the oldest one's copy event and only then drops it. Freeing after that wait is
  safe for torch's stream-ordered allocator (no ``record_stream``, whose deferred frees let the
  allocator's reserved memory grow when copies lag), and the wait is free unless copies fall more
  than ``DEVICE_WINDOW`` layers behind compute, where it is the back-pressure that bounds memory.
  The last layers' inputs are still on the GPU when the backward starts and are used as they are.
- Backward: the destination tensor is allocated on the compute stream, the side stream waits for
  the compute stream (the allocator may have handed out memory that queued kernels still use),
  copies, records an event, and the compute stream waits on that event before the recompute.
- Prefetch: every handle keeps a weak reference to the handle packed just before it (the
  forward-order registry: a singly linked list, newest first, per process). Unpacking layer i's
  input starts layer i-1's copy right behind its own on the side stream, so it overlaps layer
  i's recompute and backward. Layers are backpropagated in reverse forward order, so this is
  the next one needed; a prefetched tensor that is never used is dropped after the compute
  stream waits on its event.
- Pinned buffers come from a pool and are reused step after step (pinning memory with
  cudaHostAlloc is slow); a buffer serves any input that fits it, and slabs outgrown by longer
  batches are dropped, so batches of varying length do not grow host memory step after step. A run
  reserves its longest micro-batch first (``reserve_tokens``), so that rising lengths do not re-pin.
  Each buffer goes back to the pool with the event of the last copy that touched it, and is
  handed out again only after that event. A slab is ordinary host memory of exactly the bytes
  its buffers need, page-locked in place (cudaHostRegister), because torch's pinned allocator
  rounds every allocation up to a power of two: a layer input of 384 MiB would hold 512, and at
  long context that third decides how many layers the host can take. Small buffers share slabs of
  ``SLAB_BYTES``; larger ones get one each. Where registering fails, slabs come from torch's pinned
  allocator (with its rounding), with a warning. ``release_pinned_memory()`` gives the pool back.

CPU
---
On CPU tensors there is nothing to offload: ``offloaded_checkpoint`` is plain recomputation
checkpointing (``offloaded_checkpoint_reference``). ``NBTUNE_KERNELS=triton`` forces the offload
machinery on CPU tensors too (copies into unpinned host buffers, no streams): that is how CI
exercises the handles, the registry, the prefetch and the pool. ``NBTUNE_KERNELS=reference``
turns offloading off everywhere.

Data parallel (DDP)
-------------------
Each rank offloads on its own GPU (the side stream, the events and the pool are per device or per
process); nothing here talks to another rank or waits on the host beyond what one GPU already
does. The checkpoint is torch's non-reentrant one, which DDP supports with
``find_unused_parameters=False`` (what nbtune's trainer asks for): the recompute runs inside the
backward, each LoRA parameter's gradient is accumulated once per backward, and DDP's per-parameter
hooks fire once, in the order its buckets expect. The reentrant checkpoint would run a nested
backward per layer, which DDP only accepts with ``static_graph=True``.

Checkpoint phase
----------------
``offloaded_checkpoint`` and ``offloaded_checkpoint_reference`` pass torch's checkpoint a
``context_fn`` (wrapping the caller's own) that marks the first run of the function as "forward"
and its rerun inside the backward as "recompute", with the module whose bound method was
checkpointed; ``checkpoint_phase()`` reads it. Kernels use it to skip work whose result the
recompute throws away: the LoRA MLP at the end of a decoder layer computes nothing there
(``lora_mlp(checkpointed_tail=True)``). The reentrant implementation has no ``context_fn``: there
the phase is None and nothing is skipped.

Partial offload
---------------
The host holds one hidden state per offloaded layer: ``tokens x hidden x 2`` bytes, 12 GiB for
llama3-8b's 32 layers at 49,152 tokens, more than free Colab's RAM. ``enable_offloaded_checkpointing(
model, offload_layers=N)`` offloads the inputs of the first N decoder layers only and checkpoints the
others plainly (``offloaded_checkpoint_reference``: their input stays on the GPU). The first ones,
because the backward reaches them last: the plain layers' backward runs while nothing needs
fetching, and the offloaded ones' prefetch chain starts with the last offloaded layer, whose input is
still in the device window. The gradients are the same either way: both paths are torch's
non-reentrant checkpoint of the same function on the same bits.

Using it with transformers
--------------------------
``enable_offloaded_checkpointing(model)`` (a ``PreTrainedModel`` or a peft ``PeftModel``) turns
on HF gradient checkpointing with this function. Transformers calls it from
``GradientCheckpointingLayer`` as
``_gradient_checkpointing_func(partial(super().__call__, **kwargs), hidden_states)`` (up to 5.22)
or ``_gradient_checkpointing_func(partial(forward, layer, **kwargs), hidden_states)`` (5.23 on,
which checkpoints ``forward`` so module hooks stay outside): the hidden states are the first
positional tensor, which is what gets offloaded; the kwargs (attention mask, position embeddings:
shared by all layers) stay in the partial, and the layer is found in either form (``_owner``).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import threading
import warnings
import weakref

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from ._backend import kernel_mode

# On CUDA, inputs smaller than this stay on the GPU: a copy's fixed cost outweighs the bytes.
MIN_OFFLOAD_BYTES = 256 * 1024
# Offloaded inputs whose GPU tensor is kept until a newer one is packed (see module docstring).
DEVICE_WINDOW = 2
# Host buffers are carved from slabs of this many bytes (a buffer larger than that is a slab of its own).
SLAB_BYTES = 4 * 2**20
# Host buffers start at multiples of this many bytes (DMA-friendly alignment).
BUFFER_ALIGN = 512

_STAT_NAMES = (
    "calls",  # offloaded_checkpoint calls that took the offload path
    "offloaded",  # inputs copied to host memory
    "kept_on_device",  # first tensor args not offloaded (too small, not floating point, ...)
    "not_seen",  # calls where torch saved the input without going through the hooks
    "fetched",  # host-to-device copies started when the input was needed
    "prefetched",  # host-to-device copies started ahead (the next layer in backward order)
    "prefetch_used",  # prefetched tensors that the recompute then used
    "from_device",  # unpacks served by a GPU tensor still in the device window
)


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(_STAT_NAMES, 0)

    def add(self, name: str, n: int = 1):
        with self.lock:
            self.counts[name] += n


_STATS = _Stats()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class _Slab:
    """One host allocation carved into ``count`` buffers of ``capacity`` bytes; ``free`` of them are
    in the pool's free lists (the rest are held by handles)."""

    def __init__(self, tensor: torch.Tensor, capacity: int, count: int, pinned: bool):
        self.tensor, self.capacity, self.count, self.pinned = tensor, capacity, count, pinned
        self.free = count
        self.retired = False


def _unregister(ptr: int) -> None:
    """Unlock a registered slab as its memory is freed, after every copy queued on the GPU (one
    may still read or write it: a buffer given back after ``clear()`` is freed, not pooled)."""
    try:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone; the process frees all
        pass


def _page_locked(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of host memory page-locked in place (cudaHostRegister), unlocked when freed; None
    where registering is not possible (the caller falls back to torch's pinned allocator)."""
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0))
    except Exception:  # noqa: BLE001 - a build without the runtime binding
        return None
    if err != 0:
        return None
    weakref.finalize(tensor.untyped_storage(), _unregister, tensor.data_ptr()).atexit = False
    return tensor


def _host_slab(nbytes: int, pinned: bool) -> torch.Tensor:
    """A flat uint8 host tensor of ``nbytes`` (page-locked for copies with CUDA when ``pinned``)."""
    if not pinned:
        return torch.empty(nbytes, dtype=torch.uint8)
    slab = _page_locked(nbytes)
    if slab is None:
        _warn_once("nbtune: host memory could not be page-locked in place (cudaHostRegister); offloaded "
                   "checkpointing uses torch's pinned allocator, which rounds each buffer up to a power of "
                   "two: host RAM may exceed the plan's figure")
        slab = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return slab


def _empty_host_cache():
    """Give torch's cached pinned blocks back to the driver (so retired slabs leave host RAM); a no-op
    where this torch has no such call."""
    for owner, name in ((getattr(torch, "accelerator", None), "empty_host_cache"), (torch._C, "_host_emptyCache")):
        fn = getattr(owner, name, None) if owner is not None else None
        if fn is not None:
            try:
                fn()
            except RuntimeError:  # no CUDA context yet: nothing is cached
                pass
            return


class _HostBufferPool:
    """Reusable host buffers (pinned for CUDA tensors).

    ``take`` returns a flat uint8 tensor of exactly ``nbytes``: a view of a free buffer of at least
    that capacity (the smallest such, given back longest ago), or of a new one; ``give`` returns it
    with the event of the last copy that reads or writes it (None when no copy is pending).

    Bounded for batches of varying length. Padded batches differ in length from one micro-batch to
    the next, and a pool keyed by exact size would keep buffers for every length it ever saw: host
    RAM growing step after step. Here a request is served by any free buffer large enough, and
    before the pool grows for a request no free buffer can hold, it drops every slab whose buffers
    are all free and too small for it (they would only ever serve shorter batches, which the new,
    larger buffers serve too), and gives pinned ones back to the driver. So the pool settles at one
    step's buffers for the longest batch seen, plus the last slab's unused buffers:
    ``nbtune.planner.host_memory.pool_bytes``, which the host-RAM plan counts.
    """

    def __init__(self):
        self._lock = threading.Lock()
        # per (capacity, pinned), the free buffers in the order they were given back: take() hands out
        # the one given back longest ago, whose last copy is the likeliest to have finished
        self._free: dict[tuple[int, bool], collections.deque] = collections.defaultdict(collections.deque)
        self._slabs: list[torch.Tensor] = []
        self._slab_records: list[_Slab] = []
        self._generation = 0  # bumped by clear(): buffers of older slabs are not taken back
        self.slab_bytes = 0
        self.buffers = 0
        self.takes = 0
        self.reuses = 0
        self.retired = 0  # slabs dropped because larger requests outgrew them

    def _fitting_key(self, nbytes: int, pinned: bool):
        """The smallest capacity >= nbytes with a free buffer, as its free-list key (None if none)."""
        keys = [k for k, free in self._free.items() if free and k[1] == pinned and k[0] >= nbytes]
        return min(keys) if keys else None

    def take(self, nbytes: int, pinned: bool, capacity: int | None = None) -> torch.Tensor:
        """A buffer of ``nbytes``; where the pool must grow, its new buffers hold ``capacity`` bytes
        (at least ``nbytes``: see :func:`reserve_tokens`)."""
        retired_pinned = False
        capacity = max(nbytes, capacity or 0)
        with self._lock:
            key = self._fitting_key(nbytes, pinned)
            fresh = key is None
            if fresh:
                retired_pinned = self._retire_smaller(capacity, pinned)
                key = (capacity, pinned)
                self._grow(capacity, pinned, self._free[key])
            whole, busy_until = self._free[key].popleft()
            whole._nbtune_slab.free -= 1
            self.takes += 1
            # A buffer is "reused" when it already held data for an earlier handle.
            if getattr(whole, "_nbtune_used", False):
                self.reuses += 1
            whole._nbtune_used = True
        if retired_pinned:
            _empty_host_cache()
        # The host waits only for a copy still in flight. First in, first out keeps that wait away:
        # the backward gives buffers back last layer first, and the oldest free buffer was reloaded
        # at the start of the previous backward, long done on the GPU. The newest one may still be
        # queued behind the host, and waiting for it would drain the launch queue every micro-batch.
        # A query is not a synchronization.
        if busy_until is not None and not busy_until.query():
            busy_until.synchronize()
        if whole.numel() == nbytes:
            return whole
        buffer = whole[:nbytes]
        buffer._nbtune_whole = whole
        return buffer

    def give(self, buffer: torch.Tensor, busy_until, pinned: bool):
        whole = getattr(buffer, "_nbtune_whole", buffer)
        with self._lock:
            slab = getattr(whole, "_nbtune_slab", None)
            if (getattr(whole, "_nbtune_generation", None) == self._generation and slab is not None
                    and not slab.retired):
                self._free[(slab.capacity, pinned)].append((whole, busy_until))
                slab.free += 1

    def _retire_smaller(self, nbytes: int, pinned: bool) -> bool:
        """Drop the slabs of this kind whose buffers are all free and smaller than ``nbytes`` (after
        the copies that last touched them); True when a pinned one went."""
        dropped = [r for r in self._slab_records
                   if r.pinned == pinned and r.capacity < nbytes and r.free == r.count and not r.retired]
        for record in dropped:
            record.retired = True
            free = self._free.pop((record.capacity, pinned), collections.deque())
            keep = collections.deque()
            for whole, busy_until in free:
                if whole._nbtune_slab is record:
                    if busy_until is not None and not busy_until.query():
                        busy_until.synchronize()
                else:
                    keep.append((whole, busy_until))
            if keep:
                self._free[(record.capacity, pinned)] = keep
            self._slab_records.remove(record)
            self._slabs = [t for t in self._slabs if t is not record.tensor]
            self.slab_bytes -= record.tensor.numel()
            self.buffers -= record.count
            self.retired += 1
        return bool(dropped) and pinned

    def _grow(self, nbytes: int, pinned: bool, free: collections.deque):
        stride = _round_up(nbytes, BUFFER_ALIGN)
        count = max(1, SLAB_BYTES // stride)
        slab = _host_slab(stride * count, pinned)
        record = _Slab(slab, nbytes, count, pinned)
        self._slabs.append(slab)
        self._slab_records.append(record)
        self.slab_bytes += slab.numel()
        self.buffers += count
        for k in range(count):  # lowest addresses first
            buffer = slab[k * stride : k * stride + nbytes]
            buffer._nbtune_generation = self._generation
            buffer._nbtune_slab = record
            free.append((buffer, None))

    def stats(self) -> dict:
        with self._lock:
            return {
                "pool_slabs": len(self._slabs),
                "pool_bytes": self.slab_bytes,
                "pool_buffers": self.buffers,
                "pool_takes": self.takes,
                "pool_reuses": self.reuses,
                "pool_retired": self.retired,
            }

    def clear(self):
        """Drop every slab (buffers still in use keep their slab alive until they are freed)."""
        with self._lock:
            pinned = any(r.pinned for r in self._slab_records)
            self._free.clear()
            self._slabs.clear()
            self._slab_records.clear()
            self._generation += 1
            self.slab_bytes = self.buffers = self.takes = self.reuses = self.retired = 0
        if pinned:
            _empty_host_cache()


_POOL = _HostBufferPool()


class _SideStreams:
    """One copy stream per CUDA device, created on first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._streams: dict[int, torch.cuda.Stream] = {}

    def get(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            stream = self._streams.get(index)
            if stream is None:
                stream = self._streams[index] = torch.cuda.Stream(device=index)
            return stream


_SIDE_STREAMS = _SideStreams()


class _ForwardOrder:
    """The forward-order registry: which offloaded input was packed last, and which ones still
    hold their device tensor (the device window). Handles link to their predecessor with a weak
    reference, so the registry never keeps a step's inputs alive."""

    def __init__(self):
        self._lock = threading.Lock()
        self._latest = None  # weakref to the newest handle
        self._window: dict[object, collections.deque] = collections.defaultdict(collections.deque)

    def register(self, handle: "_OffloadedInput") -> list:
        """Link ``handle`` after the newest one; return the handles leaving the device window."""
        with self._lock:
            handle.previous = self._latest
            self._latest = weakref.ref(handle)
            window = self._window[handle.device]
            window.append(weakref.ref(handle))
            leaving = []
            while len(window) > DEVICE_WINDOW:
                old = window.popleft()()
                if old is not None:
                    leaving.append(old)
            return leaving


_ORDER = _ForwardOrder()


class _OffloadedInput:
    """One checkpointed layer's input, held in a host buffer from its forward to its backward.

    ``unpack()`` gives back a tensor with the same bits on the original device; it can be called
    more than once (``retain_graph=True``): the host copy lives as long as the handle.
    """

    def __init__(self, tensor: torch.Tensor):
        self.shape = tensor.shape
        self.dtype = tensor.dtype
        self.device = tensor.device
        self.is_cuda = tensor.is_cuda
        self.nbytes = tensor.numel() * tensor.element_size()
        self.previous = None  # weakref to the handle packed before this one (set by _ORDER)
        self.unpacked = False
        self.ahead = None  # (device tensor, ready event, stream it is for) started by a prefetch
        row_bytes = tensor.shape[-1] * tensor.element_size() if tensor.dim() else self.nbytes
        self._buffer = _POOL.take(self.nbytes, pinned=self.is_cuda, capacity=row_bytes * (_RESERVED_TOKENS or 0))
        self.host = self._buffer.view(self.dtype).view(self.shape)
        self.host_busy_until = None  # event of the last copy touching the host buffer
        if self.is_cuda:
            self.compute_stream = torch.cuda.current_stream(self.device)
            side = _SIDE_STREAMS.get(self.device)
            side.wait_stream(self.compute_stream)  # the tensor is written by queued compute work
            with torch.cuda.stream(side):
                self.host.copy_(tensor, non_blocking=True)
            self.copied_out = side.record_event()
            self.host_busy_until = self.copied_out
        else:
            self.compute_stream = None
            self.copied_out = None
            self.host.copy_(tensor)
        # Kept until the handle leaves the device window (or is unpacked first).
        self.device_tensor = tensor
        for old in _ORDER.register(self):
            old.release_device_tensor()

    # -- device side -------------------------------------------------------------------------
    def release_device_tensor(self):
        """Drop the original device tensor once its copy-out is known to be ordered before any
        later use of its memory on the compute stream."""
        tensor, self.device_tensor = self.device_tensor, None
        if tensor is not None and self.is_cuda:
            self.compute_stream.wait_event(self.copied_out)
        del tensor

    def _copy_in(self, stream) -> tuple:
        """Start a host-to-device copy; return (device tensor, event after which it is ready)."""
        if not self.is_cuda:
            return self.host.clone(), None
        with torch.cuda.stream(stream):  # allocate on the stream that will use the tensor
            device_tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        side = _SIDE_STREAMS.get(self.device)
        # The allocator may have recycled memory that kernels queued on `stream` still use.
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            device_tensor.copy_(self.host, non_blocking=True)
        ready = side.record_event()
        self.host_busy_until = ready
        return device_tensor, ready

    def prefetch(self, stream):
        """Start copying this input back ahead of its use (no-op if already there or used)."""
        if self.unpacked or self.ahead is not None or self.device_tensor is not None:
            return
        self.ahead = (*self._copy_in(stream), stream)
        _STATS.add("prefetched")

    def unpack(self) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device) if self.is_cuda else None
        if self.device_tensor is not None:  # still in the device window: no copy needed
            result = self.device_tensor.detach()
            ready = None
            self.release_device_tensor()
            _STATS.add("from_device")
        elif self.ahead is not None:
            (result, ready, _), self.ahead = self.ahead, None
            _STATS.add("prefetch_used")
        else:
            result, ready = self._copy_in(stream)
            _STATS.add("fetched")
        self.unpacked = True
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.prefetch(stream)
        if ready is not None:
            stream.wait_event(ready)
        return result

    def __del__(self):
        try:
            if self.ahead is not None and self.is_cuda:
                # Never used: order the free after the copy into it.
                _, ready, stream = self.ahead
                stream.wait_event(ready)
            self.ahead = None
            if getattr(self, "device_tensor", None) is not None:
                self.release_device_tensor()
            if getattr(self, "_buffer", None) is not None:
                _POOL.give(self._buffer, self.host_busy_until, pinned=self.is_cuda)
                self._buffer = self.host = None
        except Exception:  # interpreter shutdown: the pool may be gone already
            pass


def _offload_wanted(tensor: torch.Tensor, force_cpu: bool) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    if tensor.is_cuda:
        if tensor.numel() * tensor.element_size() < MIN_OFFLOAD_BYTES:
            return False
        return not torch.cuda.is_current_stream_capturing()
    return force_cpu and tensor.device.type == "cpu"


class _InputOffloadHooks:
    """Saved-tensor hooks active around one ``torch.utils.checkpoint`` call: they see the
    tensors checkpoint saves as its inputs, offload the target (the first tensor argument) and
    pass every other one through unchanged."""

    def __init__(self, target: torch.Tensor):
        self.target = target
        self.seen = False  # whether checkpoint saved the target through these hooks
        self.offloaded = False

    def pack(self, tensor):
        if tensor is not self.target:
            return tensor  # other inputs (and the target saved a second time) stay as they are
        self.target = None  # the hooks must not keep the input alive
        self.seen = True
        try:
            handle = _OffloadedInput(tensor)
        except RuntimeError as error:  # e.g. pinned host memory exhausted
            _warn_once(f"offloaded_checkpoint: could not offload ({error}); inputs stay on the device")
            return tensor
        self.offloaded = True
        _STATS.add("offloaded")
        return handle

    @staticmethod
    def unpack(packed):
        return packed.unpack() if isinstance(packed, _OffloadedInput) else packed


def _resolve_reentrant(use_reentrant) -> bool:
    return False if use_reentrant is None else bool(use_reentrant)


# ----------------------------------------------------------------------------- checkpoint phase
CheckpointPhase = collections.namedtuple("CheckpointPhase", ["name", "owner"])
CheckpointPhase.__doc__ = """Where a checkpointed function is running: ``name`` is "forward" (its first run,
nothing saved) or "recompute" (its rerun inside the backward, which rebuilds the saved tensors and
whose outputs are thrown away); ``owner`` is the module whose bound method was checkpointed (a
transformers decoder layer), or None."""

_PHASE = threading.local()  # the recompute runs on autograd's device thread: one value per thread


def checkpoint_phase() -> CheckpointPhase | None:
    """The innermost checkpointed function this thread is running (None outside any), for kernels
    that may skip work whose result the recompute throws away (``lora_mlp(checkpointed_tail=True)``).
    Known for torch's non-reentrant checkpoint as run by ``offloaded_checkpoint`` and
    ``offloaded_checkpoint_reference``; the reentrant one reports None."""
    return getattr(_PHASE, "value", None)


class _InPhase:
    """Context manager that sets ``checkpoint_phase()`` around ``inner``; reusable (a second
    backward through the same graph recomputes again)."""

    def __init__(self, phase: CheckpointPhase, inner):
        self.phase, self.inner, self.previous = phase, inner, []

    def __enter__(self):
        self.previous.append(getattr(_PHASE, "value", None))
        _PHASE.value = self.phase
        return self.inner.__enter__()

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            _PHASE.value = self.previous.pop()


def _owner(function):
    """The module a checkpointed function runs, else None. Transformers up to 5.22 checkpoints
    ``partial(super().__call__, **kwargs)`` (a bound method: its ``__self__``); 5.23 on checkpoints
    ``partial(forward, layer, **kwargs)`` (the class's plain function with the layer as its first
    bound argument). Partials are unwrapped down to the function, collecting their positional
    arguments; a bound method answers with its object, a plain function with its first positional
    argument when that is an ``nn.Module``."""
    bound_args = ()
    while isinstance(function, functools.partial):
        bound_args = tuple(function.args) + bound_args
        function = function.func
    owner = getattr(function, "__self__", None)
    if owner is not None:
        return owner
    if bound_args and isinstance(bound_args[0], torch.nn.Module) and callable(function):
        return bound_args[0]
    return None


def _with_phases(function, use_reentrant: bool, kwargs: dict) -> dict:
    """kwargs for torch's checkpoint with a ``context_fn`` that marks the forward and the recompute
    (wrapping the caller's own ``context_fn``, if any), and ``determinism_check="none"`` unless the
    caller gives one. torch's default check records every saved tensor's shape, dtype and device in
    the forward and compares the recomputed ones: host time per saved tensor, ~4% of a patched
    layer's host time in a step (benchmarks/host_time_cpu.py: 3.70 -> 3.55 ms per layer), for a recompute
    that the tests prove exact (loss and gradients against unpatched transformers). Reentrant
    checkpointing has neither."""
    if use_reentrant:
        return kwargs
    user_context_fn = kwargs.get("context_fn")
    owner = _owner(function)

    def context_fn():
        forward_ctx, recompute_ctx = user_context_fn() if user_context_fn is not None else (
            contextlib.nullcontext(), contextlib.nullcontext())
        return (_InPhase(CheckpointPhase("forward", owner), forward_ctx),
                _InPhase(CheckpointPhase("recompute", owner), recompute_ctx))

    return {"determinism_check": "none", **kwargs, "context_fn": context_fn}


def offloaded_checkpoint_reference(function, *args, use_reentrant=None, **kwargs):
    """Plain recomputation checkpointing (``torch.utils.checkpoint.checkpoint``), nothing
    offloaded: what ``offloaded_checkpoint`` computes, and what it runs on CPU tensors.
    ``use_reentrant=None`` means False (torch's recommended implementation)."""
    reentrant = _resolve_reentrant(use_reentrant)
    return _torch_checkpoint(function, *args, use_reentrant=reentrant, **_with_phases(function, reentrant, kwargs))


def offloaded_checkpoint(function, *args, use_reentrant=None, **kwargs):
    """Drop-in for ``torch.utils.checkpoint.checkpoint`` that keeps the first tensor argument
    (the layer's input hidden states) in pinned CPU memory between forward and backward.

    ``function(*args, **kwargs)`` runs without keeping its activations; in backward, the input
    comes back to the GPU (prefetched while the layer after it in backward order computes), the
    function is recomputed with the forward's RNG and autocast state, and gradients flow to every
    input and captured parameter that requires grad. Checkpoint's own keyword arguments
    (``preserve_rng_state``, ``determinism_check``, ``context_fn``, ``early_stop``, ``debug``)
    pass through; every other keyword goes to ``function``. ``use_reentrant=None`` means False;
    True runs torch's reentrant checkpoint (which needs an input that requires grad for
    parameter gradients), offloaded the same way. Returns what ``function`` returns.

    Offloading applies to a floating-point CUDA tensor of at least ``MIN_OFFLOAD_BYTES``; any
    other call is plain recomputation checkpointing (see the module docstring for
    ``NBTUNE_KERNELS``).
    """
    mode = kernel_mode()
    target = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if (
        mode == "reference"
        or target is None
        or not torch.is_grad_enabled()
        or not _offload_wanted(target, force_cpu=mode == "triton")
    ):
        if target is not None and target.is_cuda and mode != "reference" and torch.is_grad_enabled():
            _STATS.add("kept_on_device")
        return offloaded_checkpoint_reference(function, *args, use_reentrant=use_reentrant, **kwargs)

    _STATS.add("calls")
    hooks = _InputOffloadHooks(target)
    del target
    reentrant = _resolve_reentrant(use_reentrant)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        outputs = _torch_checkpoint(function, *args, use_reentrant=reentrant, **_with_phases(function, reentrant, kwargs))
    if not hooks.seen:
        _STATS.add("not_seen")
        hooks.target = None
        _warn_once(
            "offloaded_checkpoint: torch.utils.checkpoint did not save its inputs through "
            "saved-tensor hooks in this torch version; the input stays on the device "
            "(plain checkpointing, still correct)."
        )
    return outputs


_WARNED: set = set()


def _warn_once(message: str):
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_RESERVED_TOKENS: int | None = None


def reserve_tokens(tokens: int | None) -> None:
    """Size the host buffers the pool grows for micro-batches of up to ``tokens`` tokens (batch x
    sequence length; None: only what each request needs).

    A run whose micro-batches vary in length (padded rows, packed rows) otherwise re-pins the whole
    pool at every new longest micro-batch: the smaller slabs are freed (cudaFreeHost, which waits for
    the device) and larger ones pinned (cudaHostAlloc), a large part of a step for a 7-8B model, on
    as many steps as the lengths keep rising. Reserving the run's longest micro-batch up front pins
    once; the host RAM is what the pool reaches anyway once that batch comes, and what the host-RAM
    plan counts. The trainer calls it (nbtune.train.run)."""
    global _RESERVED_TOKENS
    _RESERVED_TOKENS = int(tokens) if tokens else None


def offload_stats() -> dict:
    """Counters since the last ``reset_offload_stats()`` plus the host-buffer pool's totals:
    calls, offloaded, kept_on_device, not_seen, fetched, prefetched, prefetch_used, from_device,
    pool_slabs, pool_bytes, pool_buffers, pool_takes, pool_reuses, pool_retired."""
    with _STATS.lock:
        counts = dict(_STATS.counts)
    counts.update(_POOL.stats())
    return counts


def reset_offload_stats():
    """Zero the counters of ``offload_stats()`` (the pool's totals stay: see release_pinned_memory)."""
    with _STATS.lock:
        for name in _STAT_NAMES:
            _STATS.counts[name] = 0


def release_pinned_memory():
    """Give the pinned host buffers back (e.g. after training). Buffers still held by a pending
    backward stay alive until it ends. Zeroes the pool's counters."""
    _POOL.clear()


def use_checkpoint_function(model, function) -> None:
    """Make every module of ``model`` that transformers checkpoints (those with a
    ``gradient_checkpointing`` flag: the rule transformers itself uses) call ``function`` as its
    checkpoint, e.g. ``offloaded_checkpoint`` or ``offloaded_checkpoint_reference``."""
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = function


def checkpointed_layers(model) -> list:
    """The modules of ``model`` that transformers checkpoints one by one (those with a
    ``gradient_checkpointing`` flag and no such module inside them), in forward order: the decoder
    layers of the language model (``get_decoder()``, where the model has one that holds them; a
    multimodal model's vision layers are left out), else every such module of the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def innermost(root) -> list:
        flagged = [m for m in root.modules() if hasattr(m, "gradient_checkpointing")]
        return [m for m in flagged if not any(c is not m and hasattr(c, "gradient_checkpointing") for c in m.modules())]

    try:
        decoder = base.get_decoder()
    except Exception:  # models without a decoder accessor, or whose accessor cannot find one
        decoder = None
    if isinstance(decoder, torch.nn.Module):
        layers = innermost(decoder)
        if layers:
            return layers
    return innermost(base)


def enable_offloaded_checkpointing(model, *, use_reentrant: bool = False, every_n_layers: int = 1,
                                   offload_layers: int | None = None):
    """Turn on gradient checkpointing with ``offloaded_checkpoint`` for a transformers model.

    ``model``: a ``PreTrainedModel`` or a peft ``PeftModel`` (its base model is used). This calls
    the model's own ``gradient_checkpointing_enable`` (so every flag transformers keeps, the
    ``every_n_layers`` choice and ``is_gradient_checkpointing`` are right, and models whose
    main input is ``input_ids`` get ``enable_input_require_grads``), then points every module's
    ``_gradient_checkpointing_func`` at ``offloaded_checkpoint``, and puts the model in train
    mode (HF layers only checkpoint while ``training``). With ``use_reentrant=True`` input
    embeddings are made to require grad in every case, since reentrant checkpointing gives
    LoRA parameters no gradient otherwise; the default non-reentrant path does not need it.
    ``offload_layers``: offload only the inputs of the first N decoder layers (:func:`checkpointed_layers`)
    and checkpoint every other checkpointed module plainly (see "Partial offload" in the module
    docstring); None: all of them. Returns ``model``. Undo with ``model.gradient_checkpointing_disable()``.
    """
    if offload_layers is not None and (isinstance(offload_layers, bool) or not isinstance(offload_layers, int)
                                       or offload_layers < 0):
        raise ValueError(f"offload_layers must be a whole number of at least 0, or None (got {offload_layers!r})")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    options = {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
    by_hand = every_n_layers != 1 and "every_n_layers" not in inspect.signature(
        base.gradient_checkpointing_enable).parameters
    if every_n_layers != 1 and not by_hand:
        options["every_n_layers"] = every_n_layers
    base.gradient_checkpointing_enable(**options)
    if by_hand:  # a transformers without every_n_layers (5.3 has none): its rule, layer i checkpointed iff i % n == 0
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index % every_n_layers == 0
    use_checkpoint_function(base, functools.partial(offloaded_checkpoint, use_reentrant=use_reentrant))
    if offload_layers is not None:
        offloaded = {id(m) for m in checkpointed_layers(base)[:offload_layers]}
        plain = functools.partial(offloaded_checkpoint_reference, use_reentrant=use_reentrant)
        for module in base.modules():
            if hasattr(module, "gradient_checkpointing") and id(module) not in offloaded:
                module._gradient_checkpointing_func = plain
    has_input_grad_hooks = bool(getattr(base, "_require_grads_hooks", None))
    if use_reentrant and not has_input_grad_hooks and hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
    model.train()
    return model


def compile_specs():
    """No ``@triton.jit`` function lives in this file (the work is DMA copies on a side stream),
    so there is nothing to compile: an empty list."""
    return []
