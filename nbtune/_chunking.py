"""How the fused loss and the checkpointed-tail LoRA MLP cut their tokens into chunks: the byte
budgets and the arithmetic, in one torch-free place. The kernels (nbtune/kernels/cross_entropy.py,
nbtune/kernels/lora.py) allocate the chunks this says; the planner (nbtune/planner/memory.py), which
may not import torch, predicts their memory from the same functions.
"""
from __future__ import annotations

MiB = 2**20

# Fused linear + cross-entropy: the (rows x V) logits chunk takes at most this many bytes ...
LOSS_CHUNK_MAX_BYTES = 256 * MiB
# ... and at most 1/LOSS_UNFUSED_FRACTION of the unfused path's fp32 logits (N x V x 4 bytes) ...
LOSS_UNFUSED_FRACTION = 8
# ... but never fewer rows than this (tiny batches: the memory is negligible, GEMMs want rows).
LOSS_MIN_CHUNK_ROWS = 128

# The checkpointed-tail LoRA MLP: one (token chunk x intermediate) buffer stays under this many
# bytes (tests lower it to force chunks): at llama3-8b sizes (14336, 16-bit) a chunk is <= 4,096
# tokens, so 2x2048-token steps run in one chunk. Rows are rounded up to a multiple of this.
MLP_CHUNK_BYTES = 128 * MiB
MLP_CHUNK_ROW_MULTIPLE = 64


def loss_chunk_rows(n_tokens: int, n_vocab: int, elem_bytes: int) -> int:
    """Tokens per chunk of the fused loss: the chunk's logits fit LOSS_CHUNK_MAX_BYTES and
    1/LOSS_UNFUSED_FRACTION of the unfused fp32 logits; a multiple of 64 rows when that many fit."""
    budget = min(LOSS_CHUNK_MAX_BYTES, n_tokens * n_vocab * 4 // LOSS_UNFUSED_FRACTION)
    rows = budget // max(1, n_vocab * elem_bytes)
    if rows >= 64:
        rows = rows // 64 * 64  # GEMM-friendly M
    rows = max(rows, LOSS_MIN_CHUNK_ROWS)
    return max(1, min(rows, n_tokens))


def _mlp_rows(tokens: int, intermediate: int, element_size: int, budget: int) -> int:
    n = max(1, -(-tokens * intermediate * element_size // budget))
    rows = -(-tokens // n)
    return max(MLP_CHUNK_ROW_MULTIPLE, -(-rows // MLP_CHUNK_ROW_MULTIPLE) * MLP_CHUNK_ROW_MULTIPLE)


def mlp_token_chunks(tokens: int, intermediate: int, element_size: int, budget: int | None = None):
    """[(start, stop), ...]: near-equal token ranges whose (rows x intermediate) buffers fit ``budget``
    bytes (default ``MLP_CHUNK_BYTES``; rows rounded up to a multiple of 64); one range when
    everything fits."""
    rows = _mlp_rows(tokens, intermediate, element_size, MLP_CHUNK_BYTES if budget is None else budget)
    return [(a, min(a + rows, tokens)) for a in range(0, tokens, rows)] or [(0, 0)]


def mlp_chunk_rows(tokens: int, intermediate: int, element_size: int) -> int:
    """Rows of the largest chunk ``mlp_token_chunks`` makes (at least 1)."""
    return max(1, min(_mlp_rows(tokens, intermediate, element_size, MLP_CHUNK_BYTES), tokens))
