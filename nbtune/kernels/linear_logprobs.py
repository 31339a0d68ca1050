"""Fused linear + log-softmax gather: each token's log-probability of its label, without the logits.

    log_probs = linear_logprobs(hidden, lm_head.weight, labels)          # (N,) or (B, S), fp32
    out = linear_logprobs(hidden, weight, labels, stats=True)            # + entropy, mean logit, top-1

What it is for
--------------
Preference training (DPO, ORPO) scores whole sequences: ``log pi(y | x) = sum_t log p(y_t | x, y_<t)``
for a chosen and a rejected reply, under the policy and under the reference. The unfused way builds
the (N x V) logits, an fp32 copy and a log-softmax of the same size, then gathers one value per
row: for V = 128256 and 4 x 1024 tokens that is ~2 GiB per copy, for 4 numbers per row kept.
Here the tokens go through the LM head in chunks of rows (one rows x V buffer, the budget of
:func:`nbtune._chunking.loss_chunk_rows`: at most 256 MiB and 1/8 of the unfused fp32 logits),
so the logits are never held whole. ``stats=True`` also returns, per token and without gradient,
what TRL's DPO trainer logs: the entropy of the next-token distribution, the mean logit over the
vocabulary and whether the label is the arg-max, from the same pass over the chunk.

Math of the backward
--------------------
For one token with raw logits x (z = x, or z = c * tanh(x / c) with Gemma 2's softcap c), label y
and ``lse = logsumexp(z)``, the output is ``l = z_y - lse`` and

    d l / d z_j = [j = y] - softmax(z)_j,
    d l / d x_j = ([j = y] - softmax(z)_j) * (1 - tanh(x_j / c)^2)      (with the softcap).

Ignored tokens (label == ignore_index) output 0 with a zero gradient row. With upstream gradients
g_i per token (DPO: the sequence's weight, the same for every completion token of a sequence) and
D the (N x V) matrix of d l_i / d x_ij,

    dHidden = diag(g) D W,      dW = (diag(g) D).T hidden,      dbias = sum_i g_i D_i.

The entropy, mean logit and top-1 flag carry no gradient (logging only):
``H = lse - sum_j softmax(z)_j z_j``, ``mean_j z_j``, ``z_y == max_j z_j``.

Implementations
---------------
* reference: full fp32 logits, ``log_softmax``, ``gather``; autograd through torch (tests, and
  ``NBTUNE_KERNELS=reference``).
* chunked torch (any device without the Triton path, e.g. CPU training): forward per chunk in fp32,
  nothing but the (N,) outputs saved; backward recomputes each chunk's softmax and multiplies.
* Triton (CUDA): per chunk, cuBLAS writes the logits into one reused buffer and ONE row kernel
  (``_logprob_rows_kernel``) streams each row twice: an online max / sum / sum(p z) / sum(z) gives
  lse, the entropy and the mean logit in one read, then, when only the hidden states need a
  gradient, the row is overwritten in place with ``([j = y] - p_j) * 2^8`` and
  ``dHidden_chunk = D_chunk @ W`` is formed right away, so backward only scales each row of the
  stored dHidden by g_i (fp32, :func:`~nbtune.kernels.cross_entropy._scale_inplace`). When W or the
  bias is trained, each row's g_i is needed for dW, so the forward only scores and backward runs the
  chunks again with ``g_i / max|g|`` folded into the stored rows (one host sync for max|g|). The
  2^8 store scale and the fp32 arithmetic are those of
  :mod:`nbtune.kernels.cross_entropy` (its docstring explains the fp16 reasons).

Backward runs once per forward on the Triton path (the stored gradients are scaled in place).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._chunking import loss_chunk_rows
from ._backend import HAS_TRITON, kernel_mode, use_triton
from ._launch import launch
from .cross_entropy import GRAD_STORE_SCALE, _scale_inplace, _vocab_block

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .cross_entropy import _tanh
else:  # pragma: no cover - platforms without triton use the torch paths
    triton = None

# Tests set these to force many small chunks / vocab blocks; None = chosen from the budget.
FORCE_CHUNK_ROWS: int | None = None
FORCE_BLOCK_V: int | None = None


class TokenLogprobs(NamedTuple):
    """Per-token outputs of ``linear_logprobs(..., stats=True)``, each shaped like the labels and 0
    (False) at ignored tokens. Only ``log_probs`` carries a gradient."""

    log_probs: torch.Tensor  # fp32, log p(label)
    entropy: torch.Tensor  # fp32, entropy of the next-token distribution
    mean_logits: torch.Tensor  # fp32, mean logit over the vocabulary
    is_top1: torch.Tensor  # bool, the label is the most likely token


def _chunk_rows(n_tokens: int, n_vocab: int, elem_bytes: int) -> int:
    if FORCE_CHUNK_ROWS is not None:
        return max(1, min(int(FORCE_CHUNK_ROWS), max(n_tokens, 1)))
    return loss_chunk_rows(n_tokens, n_vocab, elem_bytes)


def _check_args(hidden, weight, labels, softcap, bias):
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., {hidden.shape[-1]}) does not match weight {tuple(weight.shape)} (V, H)")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)} token for token")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


# ----------------------------------------------------------------------------- reference
def linear_logprobs_reference(hidden, weight, labels, ignore_index=-100, softcap=None, bias=None,
                              stats: bool = False):
    """Plain torch over the full fp32 logits (N x V): the ground truth the other paths are tested
    against. Same semantics and outputs as :func:`linear_logprobs`."""
    _check_args(hidden, weight, labels, softcap, bias)
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    z = F.linear(h, weight.float(), None if bias is None else bias.float())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = labels.reshape(-1).to(z.device)
    valid = flat != ignore_index
    safe = torch.where(valid, flat, torch.zeros_like(flat))
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, safe[:, None]).squeeze(1) * valid
    if not stats:
        return logp.view(labels.shape)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
        mean = z.mean(-1) * valid
        top1 = (z.argmax(-1) == safe) & valid
    return TokenLogprobs(*(t.view(labels.shape) for t in (logp, entropy, mean, top1)))


# ----------------------------------------------------------------------------- chunked torch
def _torch_chunk(h, weight, bias, labels, ignore_index, softcap):
    """(z fp32, tanh(x / c) or None, valid mask, safe labels) of one chunk of tokens."""
    x = F.linear(h.to(weight.dtype), weight, bias).float()
    t = None
    if softcap is not None:
        t = torch.tanh(x / softcap)
        z = softcap * t
    else:
        z = x
    valid = labels != ignore_index
    return z, t, valid, torch.where(valid, labels, torch.zeros_like(labels))


class _ChunkedTorchLogprobs(torch.autograd.Function):
    """Forward per chunk in fp32, saving only the inputs; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, stats):
        n = hidden.shape[0]
        device = hidden.device
        logp = torch.zeros(n, dtype=torch.float32, device=device)
        entropy = torch.zeros(n, dtype=torch.float32, device=device)
        mean = torch.zeros(n, dtype=torch.float32, device=device)
        top1 = torch.zeros(n, dtype=torch.bool, device=device)
        rows = _chunk_rows(n, weight.shape[0], 4)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z, _, valid, safe = _torch_chunk(hidden[start:end], weight, bias, labels[start:end], ignore_index, softcap)
            lse = torch.logsumexp(z, dim=-1)
            logp[start:end] = (z.gather(1, safe[:, None]).squeeze(1) - lse) * valid
            if not stats:
                continue
            p = torch.exp(z - lse[:, None])
            entropy[start:end] = (lse - (p * z).sum(-1)) * valid
            mean[start:end] = z.mean(-1) * valid
            top1[start:end] = (z.argmax(-1) == safe) & valid
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.ignore_index, ctx.softcap = ignore_index, softcap
        if not stats:
            return logp
        ctx.mark_non_differentiable(entropy, mean, top1)
        return logp, entropy, mean, top1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        dh = torch.zeros_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        g = grad_logp.to(torch.float32)
        rows = _chunk_rows(n, weight.shape[0], 4)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z, t, valid, safe = _torch_chunk(hidden[start:end], weight, bias, labels[start:end], ctx.ignore_index,
                                             ctx.softcap)
            d = -torch.softmax(z, dim=-1)
            d.scatter_add_(1, safe[:, None], torch.ones_like(d[:, :1]))
            if t is not None:
                d.mul_(1.0 - t * t)
            d.mul_((g[start:end] * valid)[:, None])
            if dh is not None:
                dh[start:end] = (d.to(weight.dtype) @ weight).to(hidden.dtype)
            if dw is not None:
                dw.addmm_(d.t(), hidden[start:end].float())
            if db is not None:
                db.add_(d.sum(0))
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None)


# ----------------------------------------------------------------------------- Triton
if HAS_TRITON:

    @triton.jit
    def _logprob_rows_kernel(
        logits_ptr,  # (rows, V) chunk of raw logits, compute dtype; overwritten with the gradient
        logits_row_stride,
        labels_ptr,  # (rows,) int64
        logp_ptr,  # (rows,) fp32 out: log p(label), 0 where ignored
        entropy_ptr,  # (rows,) fp32 out (STATS)
        mean_ptr,  # (rows,) fp32 out (STATS)
        top1_ptr,  # (rows,) int8 out (STATS)
        row_scale_ptr,  # (rows,) fp32, read only when HAS_ROW_SCALE
        n_vocab,
        ignore_index,
        softcap,
        grad_store_scale,
        HAS_SOFTCAP: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        STATS: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One token: log p(label) (and its stats), the logits row overwritten with its gradient.

        Pass 1 streams the row in BLOCK_V blocks with a running max m and running sums, rescaled by
        exp(m_old - m_new) whenever the max grows: s = sum exp(z - m), t = sum exp(z - m) * z and
        (not rescaled) sum z. Then lse = m + log(s), log p(y) = z_y - lse, entropy = lse - t / s,
        mean = sum z / V, top-1 = (z_y >= m). Pass 2 (WRITE_GRAD) stores
        ([j = y] - exp(z_j - lse)) * (1 - tanh(x_j / c)^2 with a softcap) * scale,
        scale = grad_store_scale (* row_scale[row]): d log p(y) / d x_j times the scale.
        Ignored rows store zeros without reading the logits. fp32 math, cast only on store.
        """
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        label = tl.load(labels_ptr + row)
        offsets = tl.arange(0, BLOCK_V)
        if label != ignore_index:
            running_max = tl.full((), float("-inf"), tl.float32)
            running_sum = tl.full((), 0.0, tl.float32)
            running_pz = tl.full((), 0.0, tl.float32)
            total_z = tl.full((), 0.0, tl.float32)
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + offsets
                in_vocab = cols < n_vocab
                z = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                z_or_inf = tl.where(in_vocab, z, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(z_or_inf, axis=0))
                rescale = tl.exp(running_max - new_max)
                e = tl.where(in_vocab, tl.exp(z_or_inf - new_max), 0.0)
                running_sum = running_sum * rescale + tl.sum(e, axis=0)
                if STATS:
                    running_pz = running_pz * rescale + tl.sum(tl.where(in_vocab, e * z, 0.0), axis=0)
                    total_z += tl.sum(tl.where(in_vocab, z, 0.0), axis=0)
                running_max = new_max
            lse = running_max + tl.log(running_sum)
            label_in_vocab = (label >= 0) & (label < n_vocab)
            z_label = tl.load(row_ptr + label, mask=label_in_vocab, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z_label = softcap * _tanh(z_label / softcap)
            # an out-of-range label gives NaN (a kernel cannot raise without a host sync)
            tl.store(logp_ptr + row, tl.where(label_in_vocab, z_label - lse, float("nan")))
            if STATS:
                tl.store(entropy_ptr + row, lse - running_pz / running_sum)
                tl.store(mean_ptr + row, total_z / n_vocab)
                tl.store(top1_ptr + row, (label_in_vocab & (z_label >= running_max)).to(tl.int8))
            if WRITE_GRAD:
                scale = grad_store_scale
                if HAS_ROW_SCALE:
                    scale = scale * tl.load(row_scale_ptr + row)
                for start in range(0, n_vocab, BLOCK_V):
                    cols = start + offsets
                    in_vocab = cols < n_vocab
                    x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
                    if HAS_SOFTCAP:
                        t = _tanh(x / softcap)
                        z = softcap * t
                    else:
                        z = x
                    grad = tl.where(cols == label, 1.0, 0.0) - tl.exp(z - lse)
                    if HAS_SOFTCAP:
                        grad = grad * (1.0 - t * t)
                    tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=in_vocab)
        else:
            tl.store(logp_ptr + row, 0.0)
            if STATS:
                tl.store(entropy_ptr + row, 0.0)
                tl.store(mean_ptr + row, 0.0)
                tl.store(top1_ptr + row, tl.zeros((), tl.int8))
            if WRITE_GRAD:
                zeros = tl.zeros((BLOCK_V,), tl.float32).to(logits_ptr.dtype.element_ty)
                for start in range(0, n_vocab, BLOCK_V):
                    cols = start + offsets
                    tl.store(row_ptr + cols, zeros, mask=cols < n_vocab)


def _block_v(n_vocab: int) -> tuple[int, int]:
    block, warps = _vocab_block(n_vocab)
    if FORCE_BLOCK_V is not None:
        block = int(FORCE_BLOCK_V)
    return block, warps


def _triton_pass(hidden, weight, bias, labels, ignore_index, softcap, *, stats, write_grads, need_dhidden,
                 need_dweight, need_dbias, row_scale=None):
    """The chunk loop of the Triton path: (log_probs, entropy, mean, top1 (int8), dHidden, dW, dbias),
    the gradients UNSCALED sums of per-token gradients (times row_scale when given), or None."""
    n, n_vocab = hidden.shape[0], weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    logp = torch.empty(n, dtype=torch.float32, device=device)
    entropy = torch.empty(n, dtype=torch.float32, device=device) if stats else logp
    mean = torch.empty(n, dtype=torch.float32, device=device) if stats else logp
    top1 = torch.empty(n if stats else 1, dtype=torch.int8, device=device)
    dhidden = torch.empty_like(hidden) if write_grads and need_dhidden else None
    dweight = torch.zeros(weight.shape, dtype=dtype, device=device) if write_grads and need_dweight else None
    dbias = torch.zeros(n_vocab, dtype=torch.float32, device=device) if write_grads and need_dbias else None
    if n == 0:
        return logp, entropy, mean, top1, dhidden, dweight, dbias
    rows = _chunk_rows(n, n_vocab, hidden.element_size())
    buffer = torch.empty(rows, n_vocab, dtype=dtype, device=device)
    block_v, num_warps = _block_v(n_vocab)
    unscale = 1.0 / GRAD_STORE_SCALE
    weight_t = weight.t()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        chunk = hidden[start:end]
        logits = buffer[: end - start]
        if bias is None:
            torch.mm(chunk, weight_t, out=logits)
        else:
            torch.addmm(bias, chunk, weight_t, out=logits)
        launch(
            _logprob_rows_kernel, (end - start,),
            logits, logits.stride(0), labels[start:end], logp[start:end], entropy[start:end], mean[start:end],
            top1[start:end] if stats else top1,
            row_scale[start:end] if row_scale is not None else logp[start:end],
            n_vocab, ignore_index, float(softcap) if softcap else 1.0, GRAD_STORE_SCALE,
            HAS_SOFTCAP=bool(softcap), WRITE_GRAD=write_grads, STATS=stats, HAS_ROW_SCALE=row_scale is not None,
            BLOCK_V=block_v, num_warps=num_warps,
        )
        if not write_grads:
            continue
        if dhidden is not None:  # beta=0: the empty buffer's contents are never read
            dhidden[start:end].addmm_(logits, weight, beta=0.0, alpha=unscale)
        if dweight is not None:
            dweight.addmm_(logits.t(), chunk, alpha=unscale)
        if dbias is not None:
            dbias.add_(logits.sum(0, dtype=torch.float32), alpha=unscale)
    return logp, entropy, mean, top1, dhidden, dweight, dbias


class _TritonLogprobs(torch.autograd.Function):
    """Forward scores (and, for the hidden states alone, stores unscaled gradients); backward
    scales them per row, or reruns the chunks when W / bias need gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, stats, grad_enabled):
        need_h, need_w, need_b = (grad_enabled and x for x in ctx.needs_input_grad[:3])
        deferred = need_w or need_b
        with torch.autocast(hidden.device.type, enabled=False):
            logp, entropy, mean, top1, dhidden, _, _ = _triton_pass(
                hidden, weight, bias, labels, ignore_index, softcap, stats=stats,
                write_grads=need_h and not deferred, need_dhidden=need_h, need_dweight=False, need_dbias=False)
        ctx.need, ctx.deferred, ctx.consumed = (need_h, need_w, need_b), deferred, False
        ctx.ignore_index, ctx.softcap = ignore_index, softcap
        ctx.dhidden = dhidden
        if deferred:
            ctx.save_for_backward(hidden, weight, bias, labels)
        if not stats:
            return logp
        top1 = top1.bool()
        ctx.mark_non_differentiable(entropy, mean, top1)
        return logp, entropy, mean, top1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, *_):
        if ctx.consumed:
            raise RuntimeError("linear_logprobs: backward ran twice on one forward; its gradients are stored in "
                               "forward and scaled in place, so retain_graph=True is not supported")
        ctx.consumed = True
        g = grad_logp.reshape(-1).to(torch.float32).contiguous()
        if not ctx.deferred:
            dhidden, ctx.dhidden = ctx.dhidden, None
            if dhidden is not None:
                _scale_inplace(dhidden, g, per_row=True)
            return dhidden, None, None, None, None, None, None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.need
        g_max = float(g.abs().max()) if g.numel() else 0.0  # the one host sync of this path
        if g_max == 0.0:
            return (torch.zeros_like(hidden) if need_h else None, torch.zeros_like(weight) if need_w else None,
                    torch.zeros_like(bias) if need_b else None, None, None, None, None, None)
        if not math.isfinite(g_max):  # inf / NaN propagate as they would unnormalized
            g_max = 1.0
        with torch.autocast(hidden.device.type, enabled=False):
            *_, dhidden, dweight, dbias = _triton_pass(
                hidden, weight, bias, labels, ctx.ignore_index, ctx.softcap, stats=False, write_grads=True,
                need_dhidden=need_h, need_dweight=need_w, need_dbias=need_b, row_scale=g / g_max)
        factor = torch.full((1,), g_max, dtype=torch.float32, device=g.device)
        for t in (dhidden, dweight):
            if t is not None:
                _scale_inplace(t, factor, per_row=False)
        if dbias is not None:
            dbias = (dbias * g_max).to(bias.dtype)
        return dhidden, dweight, dbias, None, None, None, None, None


# ----------------------------------------------------------------------------- public
def linear_logprobs(hidden, weight, labels, ignore_index=-100, softcap=None, bias=None, stats: bool = False):
    """log p(label) of every token under ``softmax(hidden @ weight.T (+ bias))``, chunked.

    hidden: (N, H) or (B, S, H); weight: (V, H), the LM head; labels: shaped like hidden's leading
    dims and ALREADY aligned with it (the caller shifts for next-token prediction); tokens whose
    label is ``ignore_index`` give 0. softcap: Gemma 2's ``softcap * tanh(logits / softcap)``.
    Returns fp32 log-probabilities shaped like ``labels`` (differentiable w.r.t. hidden, weight and
    bias); with ``stats=True`` a :class:`TokenLogprobs` that adds the entropy, the mean logit and
    the top-1 flag (no gradient). Triton on CUDA, chunked torch elsewhere (module docstring);
    ``NBTUNE_KERNELS=reference`` takes the full-logits reference.
    """
    _check_args(hidden, weight, labels, softcap, bias)
    shape = labels.shape
    if kernel_mode() == "reference":
        return linear_logprobs_reference(hidden, weight, labels, ignore_index, softcap, bias, stats)
    flat_labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64).contiguous()
    if use_triton(hidden, weight, labels, bias):
        dtype = hidden.dtype
        if torch.is_autocast_enabled(hidden.device.type):  # what F.linear would run in under autocast
            dtype = torch.get_autocast_dtype(hidden.device.type)
        h = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
        outs = _TritonLogprobs.apply(h, weight.to(dtype), None if bias is None else bias.to(dtype).contiguous(),
                                     flat_labels, int(ignore_index), softcap, stats, torch.is_grad_enabled())
    else:
        h = hidden.reshape(-1, hidden.shape[-1])
        outs = _ChunkedTorchLogprobs.apply(h, weight, bias, flat_labels, int(ignore_index), softcap, stats)
    if not stats:
        return outs.view(shape)
    return TokenLogprobs(*(t.view(shape) for t in outs))


def compile_specs():
    from .compile_check import CompileSpec

    specs = []
    for tname, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        targets = (80, 90) if dt == torch.bfloat16 else (75, 80, 90)
        sig = {
            "logits_ptr": f"*{tname}", "logits_row_stride": "i32", "labels_ptr": "*i64", "logp_ptr": "*fp32",
            "entropy_ptr": "*fp32", "mean_ptr": "*fp32", "top1_ptr": "*i8", "row_scale_ptr": "*fp32",
            "n_vocab": "i32", "ignore_index": "i32", "softcap": "fp32", "grad_store_scale": "fp32",
            "HAS_SOFTCAP": "constexpr", "WRITE_GRAD": "constexpr", "STATS": "constexpr",
            "HAS_ROW_SCALE": "constexpr", "BLOCK_V": "constexpr",
        }
        block_v, _ = _vocab_block(128256)
        for softcap, write, stats, row_scale in ((False, True, True, False), (True, True, False, True),
                                                 (False, False, True, False)):
            specs.append(CompileSpec(
                name=f"logprob_rows[{tname},cap={int(softcap)},grad={int(write)},stats={int(stats)},"
                     f"rs={int(row_scale)}]",
                fn=_logprob_rows_kernel, signature=sig,
                constexprs=dict(HAS_SOFTCAP=softcap, WRITE_GRAD=write, STATS=stats, HAS_ROW_SCALE=row_scale,
                                BLOCK_V=block_v),
                targets=targets,
            ))
    return specs
