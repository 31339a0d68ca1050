"""Causal attention for the patched training path: torch SDPA, no (S x S) mask for the whole row.

The patched model forward (``common.model_forward``) decides once per step whether the batch can
take this path and, if so, hands every layer an :class:`AttentionPlan` in place of the attention
mask. What the plan covers, and why each case is exact:

- **No padding / right padding** (``segments is None``): SDPA with ``is_causal=True`` over the whole
  row. With right padding a real token never attends to a later pad (causality does that), so real
  tokens see exactly what transformers' padding mask lets them see; only the pad positions' own
  outputs differ, and their labels are -100. Left padding (or holes in the mask) is not exact this
  way: the model forward sends such batches to transformers' own path. Right-padded rows and
  rows from a data collator (their length changes every step) keep SDPA off its cuDNN backend on
  CUDA, which would build a new execution plan for every new length
  (:func:`padded_attention_backend`).
- **Padding-free packing** (several sequences in one row, ``position_ids`` restarting, as TRL's
  padding-free collator makes them; its ``cu_seq_lens_q`` is used when given): nothing attends
  across a boundary and no mask is built. How the packed batch attends is one switch,
  :func:`packed_attention_backend` (``NBTUNE_PACKED_ATTENTION``):

  - ``varlen`` (default with the Triton kernels, i.e. on CUDA): the batch rows laid end to end,
    one launch of ``nbtune.kernels.varlen_attention`` for every sequence of every row (window and
    softcap included), whatever the number of sequences;
  - ``flex``: FlexAttention (``torch.nn.attention.flex_attention``, compiled) with a document
    mask, where this torch has it;
  - ``pieces`` (CPU, ``NBTUNE_KERNELS=reference``, attention dropout): the row is cut into its
    sequences and SDPA runs causally on each. Runs of length-1 pieces (the pad tail that
    ``pad_to_multiple_of`` leaves, every pad its own "sequence") are answered without SDPA: a
    token that sees only itself outputs its own value.
- **Sliding window** (Mistral, Qwen2/3 sliding layers, Gemma 2/3 local layers, Phi-3): exact
  transformers semantics, query i sees keys j with ``i - window < j <= i``. A sequence no longer
  than the window is plain causal. A longer one runs in query chunks of ``window`` tokens, each
  against the ``2 * window - 1`` keys it can see, with a (window x 2 window) band mask: memory
  grows with the window, never with the row.
- **Attention logit softcapping** (Gemma 2: ``scores = c * tanh(scores / c)`` before the softmax)
  cannot go through SDPA, which has no hook between the two matmuls. Where the packed backend is
  ``varlen`` or ``flex``, those run it (every row one sequence when the batch is not packed);
  otherwise (CPU, reference) :class:`SoftcapAttention` is
  an exact, chunked attention with a hand-written backward (FlashAttention's recipe in plain torch):
  the forward keeps only q, k, v, the output and one fp32 log-sum-exp per query; the backward
  recomputes each chunk's probabilities. Peak extra memory is one (chunk x keys) fp32 block, so
  Gemma 2 trains without the O(S^2) attention weights transformers' eager path stores. Math of
  its backward (per query row, ``s`` raw scaled scores, ``t = tanh(s / c)``, ``z = c t``,
  ``p = softmax(z)``, ``o = p V``, ``dO`` incoming):

      dV  = p^T dO
      dp  = dO V^T
      dz  = p * (dp - rowsum(dO * o))          (softmax backward; rowsum(dO*o) = sum_j p_j dp_j)
      ds  = dz * (1 - t^2) * scale             (d z / d s = 1 - t^2; s = scale * q k^T)
      dq  = ds K,   dK = ds^T q

GQA: SDPA's ``enable_gqa`` where it stays on a fast kernel (CPU; CUDA flash, i.e. sm80+ with no
mask), otherwise k/v are repeated per query head (on a T4 only the memory-efficient kernel runs,
and it has no GQA: ``enable_gqa`` there would silently fall back to the O(S^2) math kernel).

Dropout on attention probabilities (``attention_dropout``, 0 for every supported family's
released checkpoints) is passed to SDPA; with softcapping it runs an explicit (autograd) path.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._env import env_text
from ...kernels._backend import use_triton
from ...kernels.varlen_attention import MAX_HEAD_DIM, varlen_attention

# Bytes of fp32 scores one chunk of the softcapped attention may hold (per forward/backward step).
SOFTCAP_CHUNK_BYTES = 64 * 2**20


def _sdpa_has_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: enable_gqa came with torch 2.5
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
        return (major, minor) >= (2, 5)


_SDPA_HAS_GQA = _sdpa_has_gqa()


@dataclass(frozen=True)
class AttentionPlan:
    """What the fast path attends to; passed to every decoder layer as its ``attention_mask``.

    ``pieces``: None when every row is one causal sequence (no padding or right padding); else one
    tuple per row of ``(start, end, single)`` pieces covering the row: ``single`` marks a run of
    length-1 sequences. ``shared``: every row has the same pieces (always true for one row), so
    each piece is sliced across the whole batch at once. ``lengths``: the real tokens of each row
    when some row is right-padded or the rows came from a data collator (their length changes
    from batch to batch); None otherwise and for packed rows.
    """

    pieces: tuple | None = None
    shared: bool = True
    lengths: tuple | None = None

    @property
    def packed(self) -> bool:
        return self.pieces is not None

    def as_pieces(self, batch: int, length: int) -> "AttentionPlan":
        """This plan with right-padded rows (``lengths``) written as pieces: each row's real tokens
        one sequence, its pad tail a run of length-1 sequences (a pad sees only itself). Real tokens
        attend exactly as before; the pads cost one token each instead of a causal row's worth."""
        if self.pieces is not None or self.lengths is None:
            return self
        rows = []
        for n in self.lengths:
            n = max(0, min(int(n), length))
            row = ((0, n, False),) if n else ()
            if n < length:
                row += ((n, length, True),)
            rows.append(row)
        shared = all(r == rows[0] for r in rows)
        return AttentionPlan(pieces=tuple(rows[:1]) if shared else tuple(rows), shared=shared)


def _pieces_from_starts(starts: list[int], length: int) -> tuple:
    """Sequence start offsets of one row -> ``(start, end, single)`` pieces, length-1 runs merged."""
    bounds = sorted(set(s for s in starts if 0 <= s < length) | {0})
    spans = [(s, e) for s, e in zip(bounds, bounds[1:] + [length])]
    pieces = []
    for s, e in spans:
        single = e - s == 1
        if single and pieces and pieces[-1][2] and pieces[-1][1] == s:
            pieces[-1] = (pieces[-1][0], e, True)
        else:
            pieces.append((s, e, single))
    return tuple(pieces)


# The batch key under which a data collator hands the model a plan it built on the host
# (:func:`plan_batch`); the patched model forward takes it instead of building one from device tensors.
PLAN_KEY = "nbtune_attention_plan"


def plan_batch(batch: dict) -> dict:
    """Add ``batch[PLAN_KEY]``: the plan of a collated batch, built from its host tensors.

    :func:`build_plan` reads the mask and the positions; on CUDA tensors each read is a device
    synchronization (up to four per micro-batch with padded or packed rows). A collator's output is
    still on the host, where the same reads cost nothing. The batch is returned as it was when it
    has no ``input_ids`` or its tensors are not on the CPU.
    """
    ids = batch.get("input_ids")
    tensors = [batch.get(k) for k in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q")]
    if not torch.is_tensor(ids) or ids.dim() != 2 or any(torch.is_tensor(t) and t.device.type != "cpu"
                                                          for t in tensors):
        return batch
    batch[PLAN_KEY] = build_plan(ids.shape[0], ids.shape[1], batch.get("attention_mask"), batch.get("position_ids"),
                                 batch.get("cu_seq_lens_q"), varying=True)
    return batch


def plan_fits(plan: AttentionPlan | None, batch: int, length: int) -> bool:
    """Whether a plan handed in with the batch describes rows of this shape (pieces cover each row)."""
    if plan is None:
        return True
    if plan.pieces is None:
        return plan.lengths is None or (len(plan.lengths) == batch and max(plan.lengths) <= length)
    if not plan.shared and len(plan.pieces) != batch:
        return False
    return all(row[-1][1] == length for row in plan.pieces)


def build_plan(batch: int, length: int, attention_mask=None, position_ids=None, cu_seq_lens=None,
               varying: bool = False):
    """An :class:`AttentionPlan` for these inputs, or None when the fast path would not be exact
    (left padding, holes in the mask, a 4D mask): the caller then runs transformers' own path.
    ``varying``: the rows come from a data collator, so their length changes from batch to batch;
    the plan then carries ``lengths`` even when no row is padded.

    On device tensors this reads the mask and the sequence starts back to the host (a few small
    copies per forward, never per layer); :func:`plan_batch` builds it from the collator's host
    tensors instead.
    """
    lengths = None
    if attention_mask is not None:
        if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2 or attention_mask.shape[-1] != length:
            return None
        mask = attention_mask.bool()
        # right padding only: along every row the mask never goes from 0 back to 1
        if length > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            return None
        real = mask.sum(-1).tolist()
        if varying or any(n < length for n in real):
            lengths = tuple(int(n) for n in real)
    elif varying:
        lengths = (length,) * batch
    starts_per_row = None
    if cu_seq_lens is not None and batch == 1 and torch.is_tensor(cu_seq_lens) and cu_seq_lens.dim() == 1:
        starts_per_row = [[int(s) for s in cu_seq_lens.tolist()[:-1]]]
    elif position_ids is not None and length > 1:
        pos = position_ids if position_ids.shape[0] == batch else position_ids.expand(batch, -1)
        # transformers' rule (masking_utils.find_packed_sequence_indices): a new sequence starts
        # wherever the position does not follow the previous one by exactly 1
        new_seq = torch.diff(pos, dim=-1) != 1
        if bool(new_seq.any()):
            rows, cols = new_seq.nonzero(as_tuple=True)
            starts_per_row = [[0] for _ in range(batch)]
            for r, c in zip(rows.tolist(), cols.tolist()):
                starts_per_row[r].append(c + 1)
    if starts_per_row is None or all(len(s) <= 1 for s in starts_per_row):
        return AttentionPlan(lengths=lengths)
    pieces = tuple(_pieces_from_starts(s, length) for s in starts_per_row)
    shared = all(p == pieces[0] for p in pieces)
    return AttentionPlan(pieces=pieces[:1] if shared else pieces, shared=shared)


# ----------------------------------------------------------------------------- helpers
def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hk, S, D) -> (B, Hk * groups, S, D), each kv head repeated for its query heads."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _native_gqa(q: torch.Tensor, with_mask: bool) -> bool:
    if not _SDPA_HAS_GQA:
        return False
    if q.device.type == "cpu":
        return True
    if q.device.type != "cuda" or with_mask or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
        return False
    return _capability_major(q.device.index) >= 8 and torch.backends.cuda.flash_sdp_enabled()


@functools.lru_cache(maxsize=None)
def _capability_major(index: int | None) -> int:
    """The compute capability's major number of a CUDA device (asked once per device: every
    layer of every step asks it)."""
    return torch.cuda.get_device_capability(index)[0]


def _sdpa(q, k, v, *, mask=None, causal=False, scale=None, dropout=0.0):
    groups = q.shape[1] // k.shape[1]
    kwargs = {}
    if groups > 1:
        if _native_gqa(q, mask is not None):
            kwargs["enable_gqa"] = True
        else:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                          scale=scale, **kwargs)


def _band_mask(q_start: int, q_end: int, k_start: int, k_end: int, window: int | None, device) -> torch.Tensor:
    """Boolean (q, k) mask: key j visible from query i iff j <= i and (no window or j > i - window)."""
    i = torch.arange(q_start, q_end, device=device)[:, None]
    j = torch.arange(k_start, k_end, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    return allowed


def _sliding_sdpa(q, k, v, window: int, scale, dropout):
    """Causal attention with a sliding window over one sequence longer than the window."""
    length = q.shape[2]
    outs = []
    for q_start in range(0, length, window):
        q_end = min(q_start + window, length)
        k_start = max(0, q_start - window + 1)
        if k_start == 0 and q_start == 0:
            outs.append(_sdpa(q[:, :, :q_end], k[:, :, :q_end], v[:, :, :q_end], causal=True, scale=scale,
                              dropout=dropout))
            continue
        mask = _band_mask(q_start, q_end, k_start, q_end, window, q.device)
        outs.append(_sdpa(q[:, :, q_start:q_end], k[:, :, k_start:q_end], v[:, :, k_start:q_end], mask=mask,
                          scale=scale, dropout=dropout))
    return torch.cat(outs, dim=2)


# ----------------------------------------------------------------------------- softcapped attention
def _softcap_chunk(n_queries: int, n_keys: int, batch_heads: int) -> int:
    per_query = max(1, n_keys * batch_heads * 4)
    return max(16, min(n_queries, SOFTCAP_CHUNK_BYTES // per_query))


class SoftcapAttention(torch.autograd.Function):
    """Exact causal attention with tanh logit softcapping (and optional sliding window), chunked
    over queries, recomputing probabilities in backward (module docstring has the math).

    apply(q, k, v, scale, softcap, window) with q (B, H, S, D), k/v (B, H, S, D) (kv heads already
    repeated) -> (B, H, S, Dv) in q's dtype.
    """

    @staticmethod
    def _scores(q_c, k_c, scale, softcap, q_start, k_start, window):
        acc = torch.promote_types(q_c.dtype, torch.float32)  # fp32 math (fp64 for fp64 inputs)
        raw = torch.matmul(q_c, k_c.transpose(-1, -2)).to(acc) * scale
        t = torch.tanh(raw / softcap)
        z = softcap * t
        allowed = _band_mask(q_start, q_start + q_c.shape[2], k_start, k_start + k_c.shape[2], window, q_c.device)
        z = z.masked_fill(~allowed, float("-inf"))
        return z, t

    @staticmethod
    def _key_range(q_start, q_end, window):
        return (0 if window is None else max(0, q_start - window + 1)), q_end

    @staticmethod
    def forward(ctx, q, k, v, scale, softcap, window):
        b, h, length, _ = q.shape
        chunk = _softcap_chunk(length, length if window is None else min(length, 2 * window), b * h)
        out = torch.empty(b, h, length, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h, length, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        for q_start in range(0, length, chunk):
            q_end = min(q_start + chunk, length)
            k_start, k_end = SoftcapAttention._key_range(q_start, q_end, window)
            z, _ = SoftcapAttention._scores(q[:, :, q_start:q_end], k[:, :, k_start:k_end], scale, softcap,
                                            q_start, k_start, window)
            row_lse = torch.logsumexp(z, dim=-1)
            p = torch.exp(z - row_lse[..., None])
            out[:, :, q_start:q_end] = torch.matmul(p.to(v.dtype), v[:, :, k_start:k_end])
            lse[:, :, q_start:q_end] = row_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.softcap, ctx.window, ctx.chunk = scale, softcap, window, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, softcap, window, chunk = ctx.scale, ctx.softcap, ctx.window, ctx.chunk
        length = q.shape[2]
        acc = lse.dtype
        dq = torch.zeros_like(q, dtype=acc)
        dk = torch.zeros_like(k, dtype=acc)
        dv = torch.zeros_like(v, dtype=acc)
        dout = dout.contiguous()
        # rowsum(dO * O) per query: the softmax backward's correction term
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        for q_start in range(0, length, chunk):
            q_end = min(q_start + chunk, length)
            k_start, k_end = SoftcapAttention._key_range(q_start, q_end, window)
            q_c, k_c, v_c = q[:, :, q_start:q_end], k[:, :, k_start:k_end], v[:, :, k_start:k_end]
            z, t = SoftcapAttention._scores(q_c, k_c, scale, softcap, q_start, k_start, window)
            p = torch.exp(z - lse[:, :, q_start:q_end, None])
            do_c = dout[:, :, q_start:q_end].to(acc)
            dv[:, :, k_start:k_end] += torch.matmul(p.transpose(-1, -2), do_c)
            dp = torch.matmul(do_c, v_c.to(acc).transpose(-1, -2))
            ds = p * (dp - delta[:, :, q_start:q_end, None]) * (1.0 - t * t) * scale
            dq[:, :, q_start:q_end] = torch.matmul(ds, k_c.to(acc))
            dk[:, :, k_start:k_end] += torch.matmul(ds.transpose(-1, -2), q_c.to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def softcap_attention_reference(q, k, v, scale, softcap, window=None, dropout=0.0, training=False):
    """Explicit softcapped causal attention under autograd (stores the (S x S) probabilities):
    transformers' eager math in fp32. Used with attention dropout, and by the tests."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    length = q.shape[2]
    z = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    z = softcap * torch.tanh(z / softcap)
    z = z.masked_fill(~_band_mask(0, length, 0, length, window, q.device), float("-inf"))
    p = torch.softmax(z, dim=-1)
    if dropout and training:
        p = F.dropout(p, p=dropout, training=True)
    return torch.matmul(p.to(v.dtype), v)


# ----------------------------------------------------------------------------- one sequence / whole batch
def _attend_sequence(q, k, v, *, scale, window, softcap, dropout):
    """Causal attention of one sequence per row (q (B, Hq, L, D), k/v (B, Hk, L, D))."""
    length = q.shape[2]
    if softcap is not None:
        if dropout:
            return softcap_attention_reference(q, k, v, scale, softcap, window, dropout, training=True)
        groups = q.shape[1] // k.shape[1]
        return SoftcapAttention.apply(q, repeat_kv(k, groups), repeat_kv(v, groups), scale, float(softcap),
                                      None if window is None or length <= window else int(window))
    if window is not None and length > window:
        return _sliding_sdpa(q, k, v, int(window), scale, dropout)
    return _sdpa(q, k, v, causal=length > 1, scale=scale, dropout=dropout)


def _attend_pieces(q, k, v, pieces, *, scale, window, softcap, dropout):
    groups = q.shape[1] // k.shape[1]
    outs = []
    for start, end, single in pieces:
        if single and not dropout:  # length-1 sequences: each token sees only itself -> its value
            outs.append(repeat_kv(v[:, :, start:end], groups))
        else:
            outs.append(_attend_sequence(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], scale=scale,
                                         window=window, softcap=softcap, dropout=dropout))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# ----------------------------------------------------------------------------- packed rows, one launch
PACKED_ATTENTION_ENV = "NBTUNE_PACKED_ATTENTION"
PACKED_ATTENTION_CHOICES = ("auto", "varlen", "flash", "flex", "pieces")
# What "auto" runs for packed rows on a GPU, by compute capability major (7: T4; 8: A100, A10,
# L4; 9: H100, H200). The one place to change once measurements say otherwise.
PACKED_ATTENTION_DEFAULT = {7: "varlen", 8: "varlen", 9: "varlen"}


def packed_attention_backend(q: torch.Tensor, dropout: float = 0.0) -> str:
    """How packed rows attend for queries like ``q``: "varlen", "flash", "flex" or "pieces" (module
    docstring).

    ``NBTUNE_PACKED_ATTENTION`` = auto (default: ``PACKED_ATTENTION_DEFAULT`` for this GPU, "pieces"
    where the Triton kernels do not run) | varlen | flash | flex | pieces. "flash" is torch's
    FlashAttention varlen kernels (``torch.nn.attention.varlen``, sm_80+, fp16/bf16; Triton's
    "varlen" where this torch lacks them or the call is softcapped). A choice this call cannot take
    falls back to "pieces": attention dropout (only the SDPA path draws it), no Triton path
    (``NBTUNE_KERNELS``), bf16 below sm_80, heads wider than the kernel's 256 channels, or no
    FlexAttention in this torch.
    """
    choice = env_text(PACKED_ATTENTION_ENV).lower() or "auto"
    if choice not in PACKED_ATTENTION_CHOICES:
        raise ValueError(f"{PACKED_ATTENTION_ENV}={choice!r} is not one of {', '.join(PACKED_ATTENTION_CHOICES)}")
    if choice == "pieces" or dropout:
        return "pieces"
    major = _capability_major(q.device.index) if q.is_cuda else None
    if choice == "auto":
        if not use_triton(q):
            return "pieces"
        choice = PACKED_ATTENTION_DEFAULT.get(major, "varlen") if major is not None else "varlen"
    if choice == "flex":
        return "flex" if _flex_available() and q.is_cuda else "pieces"
    if choice == "flash" and _torch_varlen() is not None and q.is_cuda and major >= 8 \
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return "flash"
    supported = q.dtype in (torch.float16, torch.float32) or (q.dtype == torch.bfloat16 and (major is None or major >= 8))
    return "varlen" if supported and q.shape[-1] <= MAX_HEAD_DIM and use_triton(q) else "pieces"


PADDED_ATTENTION_ENV = "NBTUNE_PADDED_ATTENTION"
PADDED_ATTENTION_CHOICES = ("auto", "varlen", "flash", "sdpa")


def padded_attention_backend(q: torch.Tensor, dropout: float = 0.0) -> str:
    """How unpacked rows of varying length (``AttentionPlan.lengths``) attend: "flash" (one SDPA
    call over the padded rows with SDPA's cuDNN backend left out), "varlen" (like packed rows: each
    row's real tokens one sequence in the packed backend's one launch, the pads one token each) or
    "sdpa" (one SDPA call, torch's own choice of backend).

    ``NBTUNE_PADDED_ATTENTION`` = auto (default: "flash" on CUDA, else "sdpa") | flash | varlen |
    sdpa. SDPA's cuDNN backend, torch's choice on sm_90, builds an execution plan for every new
    sequence length (~1.8 ms of host time per call), and batches from a data set change length
    every step; FlashAttention (sm_80+; the memory-efficient kernel below that) builds none. A
    choice this call cannot take falls back to "sdpa". Measured through the trainer in
    benchmarks/NOTES.md, "Packed rows and the trainer path".
    """
    choice = env_text(PADDED_ATTENTION_ENV).lower() or "auto"
    if choice not in PADDED_ATTENTION_CHOICES:
        raise ValueError(f"{PADDED_ATTENTION_ENV}={choice!r} is not one of {', '.join(PADDED_ATTENTION_CHOICES)}")
    if choice == "varlen":
        return "varlen" if packed_attention_backend(q, dropout) != "pieces" else "sdpa"
    if choice in ("auto", "flash"):
        return "flash" if q.is_cuda and _SDPA_BACKENDS is not None else "sdpa"
    return "sdpa"


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    return sdpa_kernel, ((SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
                         (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
                         (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled))


_SDPA_BACKENDS = _sdpa_backends()


def _without_cudnn():
    """A context in which SDPA may take every backend now enabled except cuDNN's (the enabled ones
    are read each call: a process may have turned some off, as the T4 emulation does)."""
    sdpa_kernel, backends = _SDPA_BACKENDS
    return sdpa_kernel([b for b, enabled in backends if enabled()] or [backends[-1][0]])


@functools.lru_cache(maxsize=8)
def _padded_pieces(plan: AttentionPlan, batch: int, length: int) -> AttentionPlan:
    return plan.as_pieces(batch, length)


@dataclass(frozen=True)
class PackedIndex:
    """A packed batch for the one-launch backends, built once per plan (every layer reuses it).

    ``cu_seqlens`` (int32, device): the sequence boundaries with the batch rows end to end, every
    token of a length-1 run its own sequence; ``bounds``: each token's sequence (start, end), as
    ``varlen_attention`` reads them; ``longest``: the longest sequence (a window at least that
    long is no window)."""

    cu_seqlens: torch.Tensor
    bounds: tuple
    longest: int


@functools.lru_cache(maxsize=4)
def packed_index(plan: AttentionPlan, batch: int, length: int, device: torch.device) -> PackedIndex:
    """The :class:`PackedIndex` of ``plan`` over (batch, length) rows, on ``device`` (one small
    host-to-device copy per plan; plans come from the host, so no device read is needed)."""
    cuts = [0]
    for b in range(batch):
        offset = b * length
        for start, end, single in plan.pieces[0] if plan.shared else plan.pieces[b]:
            cuts.extend(range(offset + start + 1, offset + end + 1) if single else (offset + end,))
    cu = torch.tensor(cuts, dtype=torch.int32)
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    n = batch * length
    # one copy to the device, each part starting 16 bytes into it (4 int32s): Triton specializes a
    # kernel on its pointers' 16-byte alignment, so parts that moved with the number of documents
    # would compile new kernel variants in the first steps of a run
    cu_room, n_room = -(-cu.numel() // 4) * 4, -(-n // 4) * 4
    packed = torch.zeros(cu_room + 2 * n_room, dtype=torch.int32)
    packed[:cu.numel()] = cu
    packed[cu_room:cu_room + n] = cu[doc]
    packed[cu_room + n_room:cu_room + n_room + n] = cu[doc + 1]
    on_device = packed.to(device)
    return PackedIndex(cu_seqlens=on_device[:cu.numel()],
                       bounds=(on_device[cu_room:cu_room + n], on_device[cu_room + n_room:cu_room + n_room + n]),
                       longest=int(lengths.max()))


def _as_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B * S, H, D): a view when t is a transposed (B, S, H, D) tensor, as the
    patched attention's projections give it."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b * s, h, d)


def _attend_varlen(q, k, v, plan, *, scale, window, softcap):
    b, hq, s, _ = q.shape
    index = packed_index(plan, b, s, q.device)
    if window is not None and window >= index.longest:
        window = None
    out = varlen_attention(_as_tokens(q), _as_tokens(k), _as_tokens(v), index.cu_seqlens, scale=scale,
                           window=window, softcap=softcap, bounds=index.bounds)
    return out.view(b, s, hq, v.shape[-1])


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """torch's ``varlen_attn`` where it takes a causal window and GQA (``window_size``,
    ``enable_gqa``), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    try:
        params = inspect.signature(varlen_attn).parameters
    except (TypeError, ValueError):
        return None
    return varlen_attn if {"window_size", "enable_gqa", "scale"} <= set(params) else None


def _attend_flash(q, k, v, plan, *, scale, window):
    """Packed rows through torch's FlashAttention varlen kernels: rows end to end, causal (or a
    sliding window: query i sees keys i - window < j <= i, FlashAttention's left window of
    ``window - 1``), GQA without repeating k/v."""
    b, hq, s, _ = q.shape
    index = packed_index(plan, b, s, q.device)
    if window is not None and window >= index.longest:
        window = None
    out = _torch_varlen()(_as_tokens(q), _as_tokens(k), _as_tokens(v), index.cu_seqlens, index.cu_seqlens,
                          index.longest, index.longest, scale=scale,
                          window_size=(-1, 0) if window is None else (int(window) - 1, 0),
                          enable_gqa=hq != k.shape[1])
    return out.view(b, s, hq, v.shape[-1])


@functools.lru_cache(maxsize=None)
def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """FlexAttention compiled once per process (eager FlexAttention is the O(S^2) math reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


# The token -> sequence-start map the FlexAttention mask reads. The mask and score functions are
# built once (per window / softcap) and read the current batch from here, so the compiled
# FlexAttention sees the same functions every step and guards only on this tensor's shape.
_FLEX_STARTS: list = [None]


@functools.lru_cache(maxsize=None)
def _document_mask_mod(window: int | None):
    def document(b, h, q_idx, kv_idx):
        starts = _FLEX_STARTS[0]
        ok = (kv_idx <= q_idx) & (starts[b, q_idx] == starts[b, kv_idx])
        return ok if window is None else ok & (q_idx - kv_idx < window)

    return document


@functools.lru_cache(maxsize=None)
def _softcap_score_mod(cap: float):
    def softcapped(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcapped


@functools.lru_cache(maxsize=4)
def _flex_block_mask(plan: AttentionPlan, batch: int, length: int, window: int | None, device: torch.device):
    """The document (+ causal, + window) BlockMask of ``plan``, per window, built once per plan."""
    from torch.nn.attention.flex_attention import create_block_mask

    _FLEX_STARTS[0] = packed_index(plan, batch, length, device).bounds[0].view(batch, length)
    return create_block_mask(_document_mask_mod(window), batch, None, length, length, device=device)


def _attend_flex(q, k, v, plan, *, scale, window, softcap):
    """FlexAttention with a document mask over the (B, H, S, D) rows as they are (no packing copy)."""
    from torch.nn.attention.flex_attention import flex_attention

    b, hq, s, _ = q.shape
    index = packed_index(plan, b, s, q.device)
    if window is not None and window >= index.longest:
        window = None
    block_mask = _flex_block_mask(plan, b, s, window, q.device)
    _FLEX_STARTS[0] = index.bounds[0].view(b, s)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out = fn(q, k, v, score_mod=None if softcap is None else _softcap_score_mod(float(softcap)), block_mask=block_mask,
             scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def attend(q, k, v, plan: AttentionPlan, *, scale: float, window: int | None = None, softcap: float | None = None,
           dropout: float = 0.0) -> torch.Tensor:
    """Causal attention under ``plan``: q (B, Hq, S, D), k/v (B, Hk, S, D) after RoPE ->
    (B, S, Hq, Dv), the layout transformers' attention functions return."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    options = dict(scale=scale, window=window, softcap=softcap, dropout=dropout)
    if plan.lengths is not None and plan.pieces is None:
        backend = padded_attention_backend(q, dropout)
        if backend == "varlen":
            plan = _padded_pieces(plan, q.shape[0], q.shape[2])
        elif backend == "flash" and softcap is None:
            with _without_cudnn():
                return _attend_sequence(q, k, v, **options).transpose(1, 2)
    if plan.pieces is None and softcap is not None and packed_attention_backend(q, dropout) != "pieces":
        # Gemma 2's softcapped rows, unpacked: each row one sequence for the one-launch kernels
        # (faster than SoftcapAttention's chunked torch loop, the same math)
        plan = AttentionPlan(pieces=(((0, q.shape[2], False),),), shared=True)
    if plan.pieces is not None:
        backend = packed_attention_backend(q, dropout)
        if backend == "flash" and softcap is None:
            return _attend_flash(q, k, v, plan, scale=scale, window=window)
        if backend in ("varlen", "flash"):
            return _attend_varlen(q, k, v, plan, scale=scale, window=window, softcap=softcap)
        if backend == "flex":
            return _attend_flex(q, k, v, plan, scale=scale, window=window, softcap=softcap)
    if plan.pieces is None:
        out = _attend_sequence(q, k, v, **options)
    elif plan.shared:
        out = _attend_pieces(q, k, v, plan.pieces[0], **options)
    else:
        out = torch.cat([_attend_pieces(q[b:b + 1], k[b:b + 1], v[b:b + 1], plan.pieces[b], **options)
                         for b in range(q.shape[0])], dim=0)
    return out.transpose(1, 2)
