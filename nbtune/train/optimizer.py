"""bitsandbytes' optimizers (AdamW 8-bit by default) stepped fast: no device synchronization per
parameter, and one update kernel for many parameters at once.

What bitsandbytes' ``Optimizer8bit.step`` costs. It walks the parameters in Python: per parameter a
config dict, one update-kernel call and a ``torch.cuda.synchronize()``. LoRA on the seven
projections of a 32-layer model has 448 trainable tensors, so a step is 448 full-device waits (the
host cannot queue the next update before the previous one ran; in data-parallel runs the wait also
stalls the collective in flight) and ~40 ms of host time on an H200, during which the GPU idles.

``sync_free(cls)`` gives a subclass of a bitsandbytes optimizer class that does two things:

* No waits. They are there for paged states (unified memory the host may touch); for ordinary
  device tensors every kernel runs on the current stream, in order, and nothing on the host reads
  the states. Paged optimizers keep bitsandbytes' own ``step``.
* Batched 8-bit updates, for non-paged two-state optimizers that use bitsandbytes' own
  ``init_state`` / ``update_step`` / ``get_config`` (Adam and AdamW in their 8-bit forms or with
  ``optim_bits=8``; LAMB with ``max_unorm=0``), 8-bit states chosen per parameter as bitsandbytes
  chooses them (``optim_bits``, ``min_8bit_size``, overrides). Per parameter group, the parameters
  with a gradient whose states are 8-bit blockwise (uint8 ``state1``), whose size is a whole number
  of 256-element blocks, with no per-parameter config override (``GlobalOptimManager``), and
  sharing device, parameter dtype, gradient dtype and step count form a *bucket*. The optimizer
  owns one flat buffer per state of each bucket (``state1``/``state2`` uint8,
  ``absmax1``/``absmax2`` float32) and every parameter's ``state1``/``state2``/``absmax1``/``absmax2``
  entry is a view into them. A step then
  gathers the bucket's gradients and parameters into flat scratch tensors, runs
  ``bitsandbytes.functional.optimizer_update_8bit_blockwise`` once over them, and copies the updated
  values back into the parameters (``torch._foreach_copy_``): a handful of kernel launches per
  bucket instead of one Python-driven update per parameter. A bucket is cut into chunks of at most
  ``max_chunk_numel`` elements at parameter boundaries; a parameter that fills a chunk alone is
  updated in place, without scratch.

Why it is bit-identical to bitsandbytes. The 8-bit blockwise update works on independent blocks of
256 elements: each block is dequantized with its own absmax, updated element by element with the
same scalars (betas, eps, lr, weight decay, step for the bias correction), and requantized with a
new absmax computed over that block alone. Elements of different blocks never meet, so one call over
the concatenation of whole-block tensors computes, block for block, what one call per tensor does,
given the same scalars: hence the bucket's equal config and step count. Each parameter's
``state['step']`` advances by one as in bitsandbytes. The quantization maps (``qmap1``/``qmap2``)
are bitsandbytes' fixed dynamic maps, the same values in every parameter's state; a bucket uses its
first parameter's.

Memory. States take what bitsandbytes' take (the flat buffers hold exactly the per-parameter states,
which are views). Per chunk the step allocates a flat copy of the gradients and of the parameters,
at most ``max_chunk_numel`` elements each (4 M by default: 16 MiB each for fp32 LoRA weights), released
before the next chunk; the caching allocator hands the same blocks back. New states (a parameter's
first step) are not allocated twice: bitsandbytes' zeros are set aside as meta tensors until the
layout is made, and the flat buffers start as zeros. When the bucket layout changes later, the
existing states are copied into fresh buffers, so for that step they briefly exist twice.

When the layout is rebuilt. It is cached, keyed on the parameters taking part (in order), their
state tensors, dtypes, devices, overrides and step counts. It is rebuilt (states copied into new
buffers, entries re-pointed) when that set changes: a parameter without gradient this step, a new
parameter, a state replaced, and after ``load_state_dict``. The learning rate, weight decay and
betas are kernel arguments read from the group every step, so a scheduler changing them costs
nothing. Parameters leaving the buckets get their states back as tensors of their own, so old
buffers are freed.

What falls back to the per-parameter update (bitsandbytes' ``update_step``, without the wait):
32-bit states (tensors under ``min_8bit_size``, ``optim_bits=32``, overrides to 32 bits), sizes
that are not a multiple of 256, overridden parameters, ``max_unorm > 0`` (LAMB's default: the norm
is per tensor), a parameter alone in its bucket, and every parameter of one-state optimizers
(Lion, SGD, RMSprop, ...) and of classes with their own update (AdEMAMix).

``register_embedding_overrides`` repeats what transformers' Trainer does for bitsandbytes 8-bit
optimizers: trainable embeddings keep 32-bit states.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BLOCK = 256  # elements per absmax in bitsandbytes' blockwise 8-bit states
STATE_KEYS = ("state1", "state2", "absmax1", "absmax2")


def _is_bnb_optimizer(cls) -> bool:
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except Exception:  # bitsandbytes missing or broken: nothing to replace
        return False
    return isinstance(cls, type) and issubclass(cls, Optimizer8bit)


def _batches_updates(cls) -> bool:
    """Whether ``cls`` steps through bitsandbytes' two-state ``update_step`` (the one whose 8-bit
    branch the buckets reproduce), with bitsandbytes' own state layout and config lookup."""
    from bitsandbytes.optim.optimizer import Optimizer2State, Optimizer8bit

    return (issubclass(cls, Optimizer2State) and cls.update_step is Optimizer2State.update_step
            and cls.init_state is Optimizer2State.init_state and cls.get_config is Optimizer8bit.get_config)


@dataclass
class _Chunk:
    """Bucket members ``[first, last)`` updated by one kernel call, and their slices of the bucket's
    flat states."""
    first: int
    last: int
    numel: int
    states: tuple  # state1, state2, absmax1, absmax2 slices


@dataclass
class _Bucket:
    """Parameters of one group stepped together: positions into the step's participants, the flat
    state buffers their states are views of, and the chunks."""
    gindex: int
    positions: list
    buffers: tuple
    chunks: list = field(default_factory=list)


@dataclass
class _Layout:
    """Which participants are stepped in buckets and which one by one, valid while ``key`` holds."""
    key: list
    held: list  # the parameters and state tensors whose ids are in the key, kept alive
    buckets: list
    one_by_one: list  # positions into the participants
    buffer_ids: set  # id() of every flat buffer, to release views into them later
    bucketed: list  # the parameters whose states are views into the buffers


class BatchedStep:
    """The step of ``sync_free`` classes: bitsandbytes' loop without the synchronization after each
    parameter and, for two-state optimizers, 8-bit updates batched per bucket (module docstring).
    Mixed in before a bitsandbytes optimizer class."""

    max_chunk_numel = 4 * 2**20  # elements per update call over gathered tensors (bounds the scratch)
    _batches = False  # set per class by sync_free

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (bitsandbytes' semantics and results)."""
        if self.is_paged:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        if not self._batches:
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

        steps_taken = getattr(self, "_steps_taken", 0)
        participants, key = self._participants(steps_taken)
        layout = getattr(self, "_layout", None)
        if layout is None or layout.key != key:
            layout = self._pack(participants, key, layout)
            self._layout = layout
        for position in layout.one_by_one:
            gindex, pindex, p, _, _ = participants[position]
            self.update_step(self.param_groups[gindex], p, gindex, pindex)
        for bucket in layout.buckets:
            self._step_bucket(bucket, participants)
        self._steps_taken = steps_taken + 1
        return loss

    def load_state_dict(self, state_dict, *args, **kwargs):
        """bitsandbytes' ``load_state_dict``; the next step packs the loaded states into buckets."""
        super().load_state_dict(state_dict, *args, **kwargs)
        self._layout = None

    def _participants(self, steps_taken):
        """The parameters stepped now, as (gindex, pindex, param, grad, state), states initialized
        the bitsandbytes way for new ones, and the layout key: per parameter its identity, state
        tensor (by id: the layout keeps those objects alive, so an id cannot be reused while it is
        cached), dtypes, device, override and step count. Step counts are stored minus the steps
        taken so far: every parameter taking part advances by one per step, so the key of an
        unchanged set stays equal."""
        index2config, pid2config = self.mng.index2config, self.mng.pid2config
        participants, key = [], []
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    self.init_state(group, p, gindex, pindex)
                    _defer_zero_states(state)
                overridden = (gindex, pindex) in index2config or id(p) in pid2config
                participants.append((gindex, pindex, p, grad, state))
                key.append((gindex, id(p), id(state["state1"]), state["step"] - steps_taken, p.dtype, grad.dtype,
                            p.device, overridden))
        return participants, key

    def _pack(self, participants, key, old):
        """A new layout for ``participants``: buckets of batchable parameters with their states
        copied into fresh flat buffers and re-pointed to views; parameters that left the old
        buckets get states of their own."""
        groups_cfg = {}
        candidates = {}
        one_by_one = []
        for position, ((gindex, pindex, p, grad, state), entry) in enumerate(zip(participants, key)):
            overridden = entry[-1]
            if not overridden and gindex not in groups_cfg:
                groups_cfg[gindex] = self.get_config(gindex, pindex, self.param_groups[gindex])
            if (overridden or state["state1"].dtype != torch.uint8 or p.numel() % BLOCK
                    or groups_cfg[gindex]["max_unorm"] > 0.0):
                one_by_one.append(position)
                continue
            candidates.setdefault((gindex, p.dtype, grad.dtype, p.device, state["step"]), []).append(position)

        buckets, buffer_ids, bucketed = [], set(), []
        for (gindex, _, _, device, _), positions in candidates.items():
            if len(positions) < 2:
                one_by_one.extend(positions)
                continue
            bucket = self._new_bucket(gindex, positions, participants, device)
            buckets.append(bucket)
            buffer_ids.update(id(b) for b in bucket.buffers)
            bucketed.extend(participants[i][2] for i in positions)
        one_by_one.sort()
        for position in one_by_one:  # stepped by bitsandbytes itself: its new states become real zeros
            _materialize_zero_states(participants[position][4], participants[position][2].device)

        if old is not None:  # parameters that left the buckets: states of their own, old buffers freed
            still = {id(p) for p in bucketed}
            for p in old.bucketed:
                if id(p) in still or p not in self.state:
                    continue
                state = self.state[p]
                for name in STATE_KEYS:
                    t = state.get(name)
                    if isinstance(t, torch.Tensor) and t._base is not None and id(t._base) in old.buffer_ids:
                        state[name] = t.clone()
        # the bucketed parameters' state1 entries are new views now: the key names what the next step finds
        key = [entry[:2] + (id(state["state1"]),) + entry[3:] for entry, (*_, state) in zip(key, participants)]
        held = [(p, state["state1"]) for _, _, p, _, state in participants]
        return _Layout(key=key, held=held, buckets=buckets, one_by_one=one_by_one, buffer_ids=buffer_ids,
                       bucketed=bucketed)

    def _new_bucket(self, gindex, positions, participants, device):
        """Flat state buffers for the parameters at ``positions`` (their current states copied in,
        their state entries re-pointed to views) and the chunks of at most ``max_chunk_numel``."""
        states = [participants[i][4] for i in positions]
        sizes = [s["state1"].numel() for s in states]
        total = sum(sizes)
        new = any(s["state1"].is_meta for s in states)
        make = torch.zeros if new else torch.empty  # new states are zeros, as bitsandbytes makes them
        buffers = (make(total, dtype=torch.uint8, device=device),
                   make(total, dtype=torch.uint8, device=device),
                   make(total // BLOCK, dtype=torch.float32, device=device),
                   make(total // BLOCK, dtype=torch.float32, device=device))
        views, copy_to, copy_from = [], [], []
        offset = 0
        for state, n in zip(states, sizes):
            for name, buffer, (lo, hi) in zip(STATE_KEYS, buffers, _spans(offset, n)):
                views.append(buffer[lo:hi].view(state[name].shape))
                if not state[name].is_meta:
                    copy_to.append(views[-1])
                    copy_from.append(state[name])
            offset += n
        if copy_to:
            torch._foreach_copy_(copy_to, copy_from)
        for i, state in enumerate(states):
            for j, name in enumerate(STATE_KEYS):
                state[name] = views[4 * i + j]

        bucket = _Bucket(gindex=gindex, positions=positions, buffers=buffers)
        first, offset, chunk_numel = 0, 0, 0
        for member, n in enumerate(sizes):
            if chunk_numel and chunk_numel + n > self.max_chunk_numel:
                bucket.chunks.append(_chunk(first, member, offset - chunk_numel, chunk_numel, buffers))
                first, chunk_numel = member, 0
            offset += n
            chunk_numel += n
        bucket.chunks.append(_chunk(first, len(sizes), offset - chunk_numel, chunk_numel, buffers))
        return bucket

    def _step_bucket(self, bucket, participants):
        """One update call per chunk of ``bucket``, with the arguments bitsandbytes' ``update_step``
        passes for 8-bit states."""
        import bitsandbytes.functional as F

        members = [participants[i] for i in bucket.positions]
        gindex, pindex = members[0][0], members[0][1]
        group = self.param_groups[gindex]
        config = self.get_config(gindex, pindex, group)
        if config["max_unorm"] > 0.0:  # changed since the layout was made: per-tensor norms
            for gindex, pindex, p, _, _ in members:
                self.update_step(group, p, gindex, pindex)
            return
        for member in members:
            member[4]["step"] += 1
        first_state = members[0][4]
        step = first_state["step"]
        betas = config["betas"]
        for chunk in bucket.chunks:
            params = [m[2] for m in members[chunk.first:chunk.last]]
            grads = [m[3] for m in members[chunk.first:chunk.last]]
            if len(params) == 1:  # alone in its chunk: updated in place
                p = params[0]
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
                flat_g, flat_p = grads[0].reshape(-1), p.view(-1)
            else:
                flat_g, flat_p = _flatten_dense_tensors(grads), _flatten_dense_tensors(params)
            if flat_g.numel() != chunk.numel or flat_p.numel() != chunk.numel:
                raise RuntimeError(f"parameter group {gindex}: parameters or gradients changed size under the "
                                   f"optimizer ({flat_p.numel()} / {flat_g.numel()} values for {chunk.numel} states)")
            state1, state2, absmax1, absmax2 = chunk.states
            F.optimizer_update_8bit_blockwise(
                self.optimizer_name, flat_g, flat_p, state1, state2,
                betas[0], betas[1], betas[2] if len(betas) >= 3 else 0.0, config.get("alpha", 0.0),
                config["eps"], step, config["lr"], first_state["qmap1"], first_state["qmap2"],
                absmax1, absmax2, config["weight_decay"], gnorm_scale=1.0, skip_zeros=config["skip_zeros"],
            )
            if len(params) > 1:
                torch._foreach_copy_(params, _unflatten_dense_tensors(flat_p, params))


def _defer_zero_states(state):
    """A parameter's new 8-bit blockwise states (bitsandbytes' zeros) become meta tensors of the same
    shape and dtype until the layout knows where they live: a bucket's flat buffers (zeroed there)
    or, stepped one by one, tensors of their own (:func:`_materialize_zero_states`). Allocating them
    all first and then the flat buffers would hold every state twice on the first step, and the
    caching allocator's reserve would keep that peak (~80 MB for a 7B model's LoRA at r=16)."""
    if state.get("state1") is None or state["state1"].dtype != torch.uint8 or "absmax1" not in state:
        return
    for name in STATE_KEYS:
        t = state[name]
        state[name] = torch.empty(t.shape, dtype=t.dtype, device="meta")


def _materialize_zero_states(state, device):
    for name in STATE_KEYS:
        t = state.get(name)
        if isinstance(t, torch.Tensor) and t.is_meta:
            state[name] = torch.zeros(t.shape, dtype=t.dtype, device=device)


def _spans(offset, n):
    """Element spans of a parameter at ``offset`` with ``n`` values in the flat state1, state2,
    absmax1, absmax2 buffers."""
    return ((offset, offset + n), (offset, offset + n),
            (offset // BLOCK, (offset + n) // BLOCK), (offset // BLOCK, (offset + n) // BLOCK))


def _chunk(first, last, offset, numel, buffers):
    states = tuple(buffer[lo:hi] for buffer, (lo, hi) in zip(buffers, _spans(offset, numel)))
    return _Chunk(first=first, last=last, numel=numel, states=states)


@functools.lru_cache(maxsize=None)
def sync_free(cls):
    """``cls`` (a bitsandbytes optimizer class) stepping without the per-parameter synchronization
    and, where its update allows, with batched 8-bit updates (``BatchedStep``); any other class is
    returned unchanged. One subclass per class."""
    if not _is_bnb_optimizer(cls):
        return cls
    return type(f"SyncFree{cls.__name__}", (BatchedStep, cls), {
        "__module__": __name__,
        "__doc__": f"bitsandbytes' {cls.__name__}, stepping without a device synchronization per parameter"
                   + (" and with 8-bit updates batched over parameters" if _batches_updates(cls) else "")
                   + " (nbtune.train.optimizer).",
        "_batches": _batches_updates(cls),
    })


def register_embedding_overrides(model, optimizer) -> int:
    """Trainable ``nn.Embedding`` weights get 32-bit optimizer states under an 8-bit bitsandbytes
    optimizer (what transformers' Trainer registers for its own bitsandbytes optimizers). Returns
    how many embeddings were registered."""
    if not _is_bnb_optimizer(type(optimizer)):
        return 0
    from bitsandbytes.optim import GlobalOptimManager

    manager = GlobalOptimManager.get_instance()
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad:
            manager.register_module_override(module, "weight", {"optim_bits": 32})
            count += 1
    return count
