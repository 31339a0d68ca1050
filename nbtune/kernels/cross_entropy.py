"""Fused linear + cross-entropy: the LM head and its loss without ever holding the full logits.

What it fuses
-------------
The unfused path (what transformers runs) is ``logits = hidden @ W.T`` for every token (N x V),
``logits.float()``, ``cross_entropy`` (which saves an fp32 log-softmax of the same size) and, in
backward, an fp32 gradient of the logits plus its cast back to the compute dtype. For llama3-8b
(V = 128256) and 2 x 2048 tokens that is 1 GiB of bf16 logits plus ~2 GiB for every fp32 copy:
about 4 GiB for "logits + their fp32 grad" alone, 5-7 GiB at the peak.

Here the tokens are processed in chunks of ``rows`` tokens. Per chunk:

1. ``logits = hidden_chunk @ W.T (+ bias)``: cuBLAS, fp32 accumulation, stored in the compute
   dtype (see "Precision" below) in ONE preallocated (rows x V) buffer reused by every chunk;
2. ONE Triton kernel (``_cross_entropy_rows_kernel``), one program per token: an online max/sum
   over the vocab in blocks gives the row's logsumexp and loss, then a second sweep overwrites the
   logits IN PLACE with the gradient of that token's loss w.r.t. its logits;
3. ``dHidden_chunk = dlogits @ W`` written straight into the preallocated dHidden rows,
   ``dW += dlogits.T @ hidden_chunk`` when W requires grad, ``dbias += sum_rows dlogits`` when the
   bias does.

So the gradients are produced during the forward pass (no second pass over the vocab, nothing of
size N x V saved for backward); backward only multiplies the stored gradients, in place, by
``grad_output`` times the reduction's scale.

Memory saved
------------
Extra memory is the chunk buffer (``rows x V`` in the compute dtype, at most 256 MiB and at most
1/8 of the unfused fp32 logits: nbtune/_chunking.py), dHidden (N x H, which the unfused path also
produces), N fp32 per-token losses and, when W is trained, dW (which the unfused path also
produces). At llama3-8b's head (N = 4096, H = 4096, V = 128256, bf16): 1024-token chunks,
250.5 MiB + 32 MiB, i.e. ~7 % of the 3.9 GiB that the unfused fp32 logits + grad take.

Math of the backward
--------------------
For one token with logits z (after the optional softcap) and label y, the loss is
``l = logsumexp(z) - z_y`` and

    d l / d z_j = softmax(z)_j - [j = y].

With Gemma 2's softcap, ``z = c * tanh(x / c)`` for the raw logits x, and by the chain rule

    d l / d x_j = (softmax(z)_j - [j = y]) * (1 - tanh(x_j / c)^2).

Ignored tokens (label == ignore_index) have l = 0 and a zero gradient row. The reduction then
scales every token's gradient by the same factor s: ``mean``: s = 1 / n_valid (n_valid = number
of non-ignored tokens), ``sum``: s = 1, ``num_items_in_batch``: s = 1 / num_items_in_batch, times
the incoming ``grad_output`` g (``none``: the per-token g_i). With D the (N x V) matrix of
d l_i / d x_ij,

    dHidden = s * g * (D @ W),   dW = s * g * (D.T @ hidden),   dbias = s * g * D.sum(0).

Precision
---------
* The logits chunk is stored in the compute dtype (bf16/fp16; fp32 for fp32 inputs), not fp32:
  transformers' own path rounds the logits to the compute dtype too (``F.linear`` in bf16, then
  ``.float()``), so fp32 storage would buy accuracy the baseline does not have, at twice the
  memory per token; and storing the gradient in the GEMM's input dtype is what lets it overwrite
  the logits in place and feed cuBLAS directly (fp32 storage would need a second, compute-dtype
  buffer: 6 instead of 2 bytes per logit). All kernel arithmetic is fp32.
* The per-token gradients are stored UNSCALED (not multiplied by 1/n_valid nor by grad_output,
  which is unknown during forward) and, in the logits buffer, multiplied by
  ``GRAD_STORE_SCALE`` = 2^8 (undone exactly by cuBLAS's fp32 ``alpha``). In fp16,
  ``softmax / n_valid`` would flush to zero (1e-5 / 4096 < fp16's smallest subnormal, 6e-8)
  before a loss scaler could lift it; stored this way probabilities down to ~2e-10 survive (the
  mass lost over 128k classes is < 3e-5) while the stored values stay <= 256, far from fp16's
  65504 in any GEMM intermediate; dHidden holds ``D @ W`` (magnitude ~|W|), scaled by ``g * s``
  in fp32 only in backward. dW holds the unscaled sum over tokens (as if the loss scale were
  n_valid) and is scaled in backward the same way.
* The loss is returned in fp32 (as transformers' ``ForCausalLMLoss`` does), whatever the inputs'
  dtype; gradients come back in the inputs' dtypes.

Semantics worth knowing
-----------------------
* ``reduction="mean"`` over 0 non-ignored tokens returns 0 with zero gradients;
  ``torch.nn.functional.cross_entropy`` returns NaN there.
* A label outside [0, V) that is not ``ignore_index`` gives a NaN loss for that token on the
  Triton path (torch raises instead; the kernel cannot raise without a host sync).
* ``reduction="none"`` with a trainable W (or bias) cannot accumulate dW in forward (each token's
  grad_output is unknown), so that combination computes only the losses in forward and runs the
  chunked pass once more in backward (one host sync for the largest |grad_output|).
* backward can run only once per forward (the stored gradients are scaled in place):
  ``retain_graph=True`` + a second backward raises.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._chunking import loss_chunk_rows
from ._backend import HAS_TRITON, next_power_of_2, use_triton
from ._launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - platforms without triton use the reference only
    triton = None

REDUCTIONS = ("mean", "sum", "none")

# Tests set this to force many small chunks; None = choose from the budget (nbtune/_chunking.py).
FORCE_CHUNK_ROWS: int | None = None

# The gradient rows are stored multiplied by this power of two (exact in every float format),
# so fp16 keeps tiny probabilities; cuBLAS's alpha = 1 / GRAD_STORE_SCALE undoes it in fp32.
GRAD_STORE_SCALE = 2.0**8


def _chunk_rows(n_tokens: int, n_vocab: int, elem_bytes: int) -> int:
    """Tokens per chunk: the chunk's logits fit 256 MiB and 1/8 of the unfused fp32 logits
    (``loss_chunk_rows``, which the planner uses too), unless a test forces a size."""
    if FORCE_CHUNK_ROWS is not None:
        return max(1, min(int(FORCE_CHUNK_ROWS), max(n_tokens, 1)))
    return loss_chunk_rows(n_tokens, n_vocab, elem_bytes)


def _vocab_block(n_vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for the row kernel: 4096-wide blocks (16 fp32 per thread at 8 warps, so
    several rows fit per SM and enough loads are in flight), 8 warps on large vocabs."""
    block = min(next_power_of_2(n_vocab), 4096)
    block = max(block, 128)
    num_warps = 8 if block >= 4096 else 4
    return block, num_warps


if HAS_TRITON:

    @triton.jit
    def _tanh(u):
        """tanh(u) = sign(u) * (1 - e^{-2|u|}) / (1 + e^{-2|u|}): no overflow for any u."""
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(u >= 0, t, -t)

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr,  # (rows, V) chunk of logits, compute dtype; overwritten with the gradient
        logits_row_stride,
        labels_ptr,  # (rows,) int64, already aligned with the logits rows
        losses_ptr,  # (rows,) fp32 out: per-token loss (0 where ignored)
        row_scale_ptr,  # (rows,) fp32, read only when HAS_ROW_SCALE: per-token grad factor
        n_vocab,
        ignore_index,
        softcap,
        grad_store_scale,
        HAS_SOFTCAP: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """Loss and d loss / d logits of one token, the logits row overwritten in place.

        Pass 1 streams the row in BLOCK_V blocks keeping a running max m and a running
        sum s of exp(z - m) (rescaled by exp(m_old - m_new) whenever the max grows), so
        logsumexp(z) = m + log(s) after one read. The loss is logsumexp(z) - z_y.
        Pass 2 (WRITE_GRAD) re-reads the row and stores
            (exp(z_j - logsumexp) - [j = y]) * (1 - tanh(x_j / c)^2 if softcap) * scale,
        scale = grad_store_scale (* row_scale[row] when HAS_ROW_SCALE), which is the
        gradient of this token's loss w.r.t. its raw logits x_j (times the scale).
        Ignored rows store loss 0 and a zero gradient row without reading the logits.
        With softcap c: z = c * tanh(x / c); all math in fp32, cast only on store.
        """
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        label = tl.load(labels_ptr + row)
        offsets = tl.arange(0, BLOCK_V)
        if label != ignore_index:
            # ---- pass 1: online max / sum of exp over the vocab ----
            running_max = tl.full((), float("-inf"), tl.float32)
            running_sum = tl.full((), 0.0, tl.float32)
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + offsets
                in_vocab = cols < n_vocab
                z = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                z = tl.where(in_vocab, z, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(z, axis=0))
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
                    tl.exp(z - new_max), axis=0
                )
                running_max = new_max
            logsumexp = running_max + tl.log(running_sum)

            label_in_vocab = (label >= 0) & (label < n_vocab)
            z_label = tl.load(row_ptr + label, mask=label_in_vocab, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z_label = softcap * _tanh(z_label / softcap)
            # Out-of-range label: NaN loss (torch raises; a kernel cannot without a host sync).
            loss = tl.where(label_in_vocab, logsumexp - z_label, float("nan"))
            tl.store(losses_ptr + row, loss)

            if WRITE_GRAD:
                scale = grad_store_scale
                if HAS_ROW_SCALE:
                    scale = scale * tl.load(row_scale_ptr + row)
                # ---- pass 2: gradient overwrites the logits ----
                for start in range(0, n_vocab, BLOCK_V):
                    cols = start + offsets
                    in_vocab = cols < n_vocab
                    x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
                    if HAS_SOFTCAP:
                        t = _tanh(x / softcap)
                        z = softcap * t
                    else:
                        z = x
                    grad = tl.exp(z - logsumexp) - tl.where(cols == label, 1.0, 0.0)
                    if HAS_SOFTCAP:
                        grad = grad * (1.0 - t * t)
                    grad = grad * scale
                    tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_vocab)
        else:
            tl.store(losses_ptr + row, 0.0)
            if WRITE_GRAD:
                zeros = tl.zeros((BLOCK_V,), tl.float32).to(logits_ptr.dtype.element_ty)
                for start in range(0, n_vocab, BLOCK_V):
                    cols = start + offsets
                    tl.store(row_ptr + cols, zeros, mask=cols < n_vocab)

    # the token count changes from step to step: not specialized on (Triton would compile a second
    # variant the first time it is a multiple of 16, in the middle of a run)
    @triton.jit(do_not_specialize=["n_elements"])
    def _scale_inplace_kernel(
        x_ptr,  # contiguous tensor, scaled in place
        factor_ptr,  # fp32: one factor, or one per row when FACTOR_PER_ROW
        n_elements,
        n_cols,
        FACTOR_PER_ROW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """x *= factor (fp32 math, cast on store): backward's grad_output * reduction scale.

        The factor is read from device memory (no host sync for 1 / n_valid or grad_output) and
        applied in fp32, so a factor like 1/4093 is not first rounded to fp16/bf16.
        """
        pid = tl.program_id(0).to(tl.int64)
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if FACTOR_PER_ROW:
            factor = tl.load(factor_ptr + offsets // n_cols, mask=mask, other=0.0)
        else:
            factor = tl.load(factor_ptr)
        tl.store(x_ptr + offsets, (x * factor).to(x_ptr.dtype.element_ty), mask=mask)


def _scale_inplace(x: torch.Tensor, factor: torch.Tensor, per_row: bool) -> torch.Tensor:
    """x *= factor in fp32 (factor: fp32, shape (1,) or (rows,) when per_row)."""
    assert x.is_contiguous() and factor.dtype == torch.float32 and factor.is_contiguous()
    n = x.numel()
    if n == 0:
        return x
    block = 4096
    launch(
        _scale_inplace_kernel, (triton.cdiv(n, block),),
        x, factor, n, x.shape[-1] if x.dim() > 1 else 1, FACTOR_PER_ROW=per_row, BLOCK=block, num_warps=8,
    )
    return x


def _chunked_pass(hidden, weight, bias, labels, ignore_index, softcap, *, write_grads, need_dhidden,
                  need_dweight, need_dbias, row_scale=None):
    """Run the chunk loop. Returns (losses fp32 (N,), dHidden | None, dW | None, dbias fp32 | None).

    The gradients returned are UNSCALED sums of per-token gradients (times row_scale when given):
    the reduction's scale and grad_output are applied by the caller.
    """
    n_tokens = hidden.shape[0]
    n_vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    losses = torch.empty(n_tokens, dtype=torch.float32, device=device)
    dhidden = torch.empty_like(hidden) if write_grads and need_dhidden else None
    dweight = None
    if write_grads and need_dweight:
        dweight = torch.empty(weight.shape, dtype=dtype, device=device)
        if n_tokens == 0:
            dweight.zero_()
    dbias = torch.zeros(n_vocab, dtype=torch.float32, device=device) if write_grads and need_dbias else None
    if n_tokens == 0:
        return losses, dhidden, dweight, dbias

    rows = _chunk_rows(n_tokens, n_vocab, hidden.element_size())
    logits_buffer = torch.empty(rows, n_vocab, dtype=dtype, device=device)
    block_v, num_warps = _vocab_block(n_vocab)
    unscale = 1.0 / GRAD_STORE_SCALE
    weight_t = weight.t()
    for chunk_index, start in enumerate(range(0, n_tokens, rows)):
        end = min(start + rows, n_tokens)
        hidden_chunk = hidden[start:end]
        logits = logits_buffer[: end - start]
        if bias is None:
            torch.mm(hidden_chunk, weight_t, out=logits)
        else:
            torch.addmm(bias, hidden_chunk, weight_t, out=logits)
        launch(
            _cross_entropy_rows_kernel, (end - start,),
            logits, logits.stride(0), labels[start:end], losses[start:end],
            row_scale[start:end] if row_scale is not None else losses[start:end],
            n_vocab, ignore_index, float(softcap) if softcap else 1.0, GRAD_STORE_SCALE,
            HAS_SOFTCAP=bool(softcap), WRITE_GRAD=write_grads, HAS_ROW_SCALE=row_scale is not None,
            BLOCK_V=block_v, num_warps=num_warps,
        )
        if not write_grads:
            continue
        if dhidden is not None:  # beta=0: the empty buffer's contents are never read
            dhidden[start:end].addmm_(logits, weight, beta=0.0, alpha=unscale)
        if dweight is not None:
            dweight.addmm_(logits.t(), hidden_chunk, beta=0.0 if chunk_index == 0 else 1.0, alpha=unscale)
        if dbias is not None:
            dbias.add_(logits.sum(0, dtype=torch.float32), alpha=unscale)
    return losses, dhidden, dweight, dbias


class _FusedLinearCrossEntropyFn(torch.autograd.Function):
    """Forward computes losses AND unscaled gradients chunk by chunk; backward scales them in place."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, reduction, num_items_in_batch,
                grad_enabled):
        need_dhidden, need_dweight, need_dbias = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        any_grad = need_dhidden or need_dweight or need_dbias
        # "none" + trainable W/bias: dW needs each token's grad_output -> second pass in backward.
        deferred = reduction == "none" and (need_dweight or need_dbias)
        with torch.autocast(hidden.device.type, enabled=False):
            losses, dhidden, dweight, dbias = _chunked_pass(
                hidden, weight, bias, labels, ignore_index, softcap,
                write_grads=any_grad and not deferred, need_dhidden=need_dhidden,
                need_dweight=need_dweight, need_dbias=need_dbias,
            )
        ctx.reduction, ctx.deferred, ctx.consumed = reduction, deferred, False
        ctx.ignore_index, ctx.softcap = ignore_index, softcap
        ctx.need = (need_dhidden, need_dweight, need_dbias)
        if deferred:
            ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.dhidden, ctx.dweight, ctx.dbias = dhidden, dweight, dbias
        ctx.bias_dtype = None if bias is None else bias.dtype

        if reduction == "none":
            ctx.denominator = None
            return losses
        if num_items_in_batch is not None:
            denominator = torch.as_tensor(num_items_in_batch, device=losses.device).to(torch.float32)
        elif reduction == "mean":  # 0 valid tokens -> 0 / 1 = 0 (torch: 0 / 0 = NaN)
            denominator = (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
        else:
            denominator = None
        ctx.denominator = denominator
        total = losses.sum()
        return total / denominator if denominator is not None else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice on one forward; its gradients are "
                "computed in forward and scaled in place, so retain_graph=True is not supported"
            )
        ctx.consumed = True
        need_dhidden, need_dweight, need_dbias = ctx.need
        if ctx.deferred:
            return _FusedLinearCrossEntropyFn._deferred_backward(ctx, grad_output)

        if ctx.reduction == "none":
            factor = grad_output.reshape(-1).to(torch.float32).contiguous()
            dhidden = ctx.dhidden
            if dhidden is not None:
                _scale_inplace(dhidden, factor, per_row=True)
            ctx.dhidden = None
            return dhidden, None, None, None, None, None, None, None, None

        factor = grad_output.reshape(1).to(torch.float32)
        if ctx.denominator is not None:
            factor = factor / ctx.denominator
        factor = factor.contiguous()
        dhidden, dweight, dbias = ctx.dhidden, ctx.dweight, ctx.dbias
        ctx.dhidden = ctx.dweight = ctx.dbias = None
        if dhidden is not None:
            _scale_inplace(dhidden, factor, per_row=False)
        if dweight is not None:
            _scale_inplace(dweight, factor, per_row=False)
        if dbias is not None:
            dbias = (dbias * factor).to(ctx.bias_dtype)
        return dhidden, dweight, dbias, None, None, None, None, None, None

    @staticmethod
    def _deferred_backward(ctx, grad_output):
        """reduction="none" with trainable W/bias: rerun the chunks with per-token factors g_i.

        The kernel scales row i by g_i / max|g| (within [-1, 1], so the stored fp16 values stay in
        range); max|g| is multiplied back in by ``_scale_inplace`` (fp32 math) on dHidden and dW.
        """
        hidden, weight, bias, labels = ctx.saved_tensors
        need_dhidden, need_dweight, need_dbias = ctx.need
        g = grad_output.reshape(-1).to(torch.float32).contiguous()
        g_max = float(g.abs().max()) if g.numel() else 0.0  # the one host sync of this path
        if g_max == 0.0:
            def zeros(t, need):
                return torch.zeros_like(t) if need else None

            return (zeros(hidden, need_dhidden), zeros(weight, need_dweight), zeros(bias, need_dbias),
                    None, None, None, None, None, None)
        if not math.isfinite(g_max):  # let inf / NaN propagate as they would unnormalized
            g_max = 1.0
        with torch.autocast(hidden.device.type, enabled=False):
            _, dhidden, dweight, dbias = _chunked_pass(
                hidden, weight, bias, labels, ctx.ignore_index, ctx.softcap,
                write_grads=True, need_dhidden=need_dhidden, need_dweight=need_dweight,
                need_dbias=need_dbias, row_scale=g / g_max,
            )
        factor = torch.full((1,), g_max, dtype=torch.float32, device=g.device)
        for t in (dhidden, dweight):
            if t is not None:
                _scale_inplace(t, factor, per_row=False)
        if dbias is not None:
            dbias = (dbias * g_max).to(bias.dtype)
        return dhidden, dweight, dbias, None, None, None, None, None, None


def _check_args(hidden, weight, labels, reduction, softcap, num_items_in_batch, bias):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError("num_items_in_batch divides the summed loss; it has no meaning with reduction='none'")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., {hidden.shape[-1]}) does not match weight {tuple(weight.shape)} (V, H)")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)} token for token")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-100, softcap=None,
                                         reduction="mean", bias=None, num_items_in_batch=None):
    """Plain torch, fp32: ``F.linear`` on upcast inputs, optional softcap, ``F.cross_entropy``.

    Same semantics as :func:`fused_linear_cross_entropy` (fp32 loss; ``mean`` over 0 valid tokens
    is 0, not torch's NaN). Materializes the full (N x V) fp32 logits: for CPU and for tests.
    """
    _check_args(hidden, weight, labels, reduction, softcap, num_items_in_batch, bias)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1]).float()
    logits = F.linear(hidden_2d, weight.float(), None if bias is None else bias.float())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat_labels = labels.reshape(-1).to(hidden.device)
    losses = F.cross_entropy(logits, flat_labels, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses.view(labels.shape)
    total = losses.sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    return total / (flat_labels != ignore_index).sum().clamp_min(1)


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, softcap=None, reduction="mean",
                               bias=None, num_items_in_batch=None):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without the full logits.

    hidden: (N, H) or (B, S, H); weight: (V, H), the LM head (frozen or trainable); labels: (N,)
    or (B, S), ALREADY aligned with hidden (the caller does the causal shift), ``ignore_index``
    tokens contribute nothing. softcap: Gemma 2's ``softcap * tanh(logits / softcap)`` before the
    softmax. reduction: ``mean`` (torch's mean over non-ignored tokens; 0 when there are none),
    ``sum`` or ``none`` (per-token fp32 losses shaped like labels, 0 at ignored tokens).
    num_items_in_batch (HF Trainer's, for gradient accumulation): loss = sum / num_items_in_batch.
    Returns the loss in fp32. On CUDA this is the chunked Triton path (module docstring); elsewhere
    the plain-torch reference.
    """
    _check_args(hidden, weight, labels, reduction, softcap, num_items_in_batch, bias)
    if not use_triton(hidden, weight, labels, bias):
        return fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index, softcap, reduction,
                                                    bias, num_items_in_batch)
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):  # what F.linear would run in under autocast
        dtype = torch.get_autocast_dtype(hidden.device.type)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
    weight_c = weight.to(dtype)  # no-op when it already matches; autograd casts dW back
    bias_c = None if bias is None else bias.to(dtype).contiguous()
    flat_labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64).contiguous()
    out = _FusedLinearCrossEntropyFn.apply(hidden_2d, weight_c, bias_c, flat_labels, int(ignore_index), softcap,
                                           reduction, num_items_in_batch, torch.is_grad_enabled())
    return out.view(labels.shape) if reduction == "none" else out


def compile_specs():
    from .compile_check import CompileSpec

    specs = []
    for tname, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        targets = (80, 90) if dt == torch.bfloat16 else (75, 80, 90)
        row_sig = {
            "logits_ptr": f"*{tname}", "logits_row_stride": "i32", "labels_ptr": "*i64", "losses_ptr": "*fp32",
            "row_scale_ptr": "*fp32", "n_vocab": "i32", "ignore_index": "i32", "softcap": "fp32",
            "grad_store_scale": "fp32", "HAS_SOFTCAP": "constexpr", "WRITE_GRAD": "constexpr",
            "HAS_ROW_SCALE": "constexpr", "BLOCK_V": "constexpr",
        }
        for softcap, write, row_scale in ((False, True, False), (True, True, True), (False, False, False)):
            block_v, _ = _vocab_block(128256)
            specs.append(CompileSpec(
                name=f"ce_rows[{tname},cap={int(softcap)},grad={int(write)},rs={int(row_scale)}]",
                fn=_cross_entropy_rows_kernel, signature=row_sig,
                constexprs=dict(HAS_SOFTCAP=softcap, WRITE_GRAD=write, HAS_ROW_SCALE=row_scale, BLOCK_V=block_v),
                targets=targets,
            ))
        scale_sig = {"x_ptr": f"*{tname}", "factor_ptr": "*fp32", "n_elements": "i32", "n_cols": "i32",
                     "FACTOR_PER_ROW": "constexpr", "BLOCK": "constexpr"}
        for per_row in (False, True):
            specs.append(CompileSpec(
                name=f"ce_scale_inplace[{tname},per_row={int(per_row)}]", fn=_scale_inplace_kernel,
                signature=scale_sig, constexprs=dict(FACTOR_PER_ROW=per_row, BLOCK=4096), targets=targets,
            ))
    return specs
