"""The plan-driven attention of the patched models against an explicit masked attention."""
from __future__ import annotations

import math

import pytest
import torch

from nbtune.models.patches import attention as A
from nbtune.models.patches.attention import AttentionPlan, attend, build_plan


def explicit_attention(q, k, v, segment_ids, window=None, softcap=None, scale=None):
    """(B, Hq, S, D) -> (B, S, Hq, D): fp64 softmax attention with an explicit (S x S) mask:
    causal, within a segment, within the window; the math transformers' eager path does."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).double()
    v = v.repeat_interleave(groups, dim=1).double()
    scale = scale or 1 / math.sqrt(q.shape[-1])
    scores = q.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    s = q.shape[2]
    i, j = torch.arange(s, device=q.device)[:, None], torch.arange(s, device=q.device)[None, :]
    allowed = (j <= i)[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if window is not None:
        allowed = allowed & (j > i - window)[None]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).to(q.dtype)


def segment_ids_of(plan: AttentionPlan, batch: int, length: int) -> torch.Tensor:
    ids = torch.zeros(batch, length, dtype=torch.long)
    if plan.pieces is None:
        return ids
    for b in range(batch):
        pieces = plan.pieces[0] if plan.shared else plan.pieces[b]
        n = 0
        for start, end, single in pieces:
            for t in range(start, end):
                ids[b, t] = n + (t - start if single else 0)
            n += (end - start) if single else 1
    return ids


def qkv(batch=2, heads=4, kv_heads=2, length=29, dim=16, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, length, dim, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


# ----------------------------------------------------------------------------- plans
def test_plan_for_unpadded_and_right_padded_batches():
    assert build_plan(2, 6) == AttentionPlan()
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert build_plan(2, 6, attention_mask=right) == AttentionPlan(lengths=(6, 3))
    assert build_plan(2, 6, attention_mask=torch.ones(2, 6)) == AttentionPlan()
    assert build_plan(2, 6, position_ids=torch.arange(6)[None]) == AttentionPlan()


@pytest.mark.parametrize("mask", [[[0, 0, 1, 1], [1, 1, 1, 1]], [[1, 0, 1, 1], [1, 1, 1, 1]]])
def test_plan_refuses_left_padding_and_holes(mask):
    assert build_plan(2, 4, attention_mask=torch.tensor(mask)) is None
    assert build_plan(2, 4, attention_mask=torch.ones(2, 1, 4, 4)) is None  # a 4-D mask: transformers' path


def test_plan_for_packed_rows_merges_length_one_runs():
    # sequences 3, 2, then four 1-token pads (TRL's pad_to_multiple_of tail: position 0 each), then 2
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0, 0, 0, 1]])
    plan = build_plan(1, 11, position_ids=pos)
    assert plan.pieces == (((0, 3, False), (3, 5, False), (5, 9, True), (9, 11, False)),)
    cu = torch.tensor([0, 3, 5, 6, 7, 8, 9, 11], dtype=torch.int32)
    assert build_plan(1, 11, position_ids=pos, cu_seq_lens=cu) == plan


def test_plan_for_rows_packed_differently():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    plan = build_plan(2, 5, position_ids=pos)
    assert not plan.shared
    assert plan.pieces == (((0, 3, False), (3, 5, False)), ((0, 2, False), (2, 5, False)))


# ----------------------------------------------------------------------------- attention vs explicit
CASES = {
    "causal": (None, None, None),
    "window": (None, 6, None),
    "packed": ([[0, 1, 2, 3, 4, 0, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 8]], None, None),
    "packed+window": ([list(range(13)) + list(range(16))], 5, None),
    "softcap": (None, None, 1.5),
    "softcap+window+packed": ([list(range(20)) + list(range(9))], 7, 1.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attend_matches_explicit_masked_attention(case):
    positions, window, softcap = CASES[case]
    q, k, v = qkv()
    b, _, s, _ = q.shape
    pos = None if positions is None else torch.tensor(positions).expand(b, -1)
    plan = build_plan(b, s, position_ids=pos)
    got = attend(q, k, v, plan, scale=0.3, window=window, softcap=softcap)
    want = explicit_attention(q, k, v, segment_ids_of(plan, b, s), window=window, softcap=softcap, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attend_rows_packed_differently():
    q, k, v = qkv(length=9)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 0, 1, 2, 3, 4, 5, 6]])
    plan = build_plan(2, 9, position_ids=pos)
    got = attend(q, k, v, plan, scale=0.25, window=3)
    want = explicit_attention(q, k, v, segment_ids_of(plan, 2, 9), window=3, scale=0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_softcap_attention_backward_matches_autograd(window, monkeypatch):
    monkeypatch.setattr(A, "SOFTCAP_CHUNK_BYTES", 1)  # chunks of 16 queries: several per sequence
    q, k, v = qkv(length=37, grad=True, dtype=torch.float64)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    plan = AttentionPlan()
    out = attend(q, k, v, plan, scale=0.4, window=window, softcap=1.2)
    ref = A.softcap_attention_reference(q2, k2, v2, 0.4, 1.2, window).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def test_softcap_attention_gradcheck():
    q, k, v = qkv(batch=1, heads=2, kv_heads=2, length=6, dim=4, grad=True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: A.SoftcapAttention.apply(a, b, c, 0.5, 0.8, 4), (q, k, v))


def test_sliding_window_chunks_do_not_scale_with_the_row(monkeypatch):
    """A row 10 windows long attends window by window: no mask wider than 2 windows is built."""
    widths = []
    band = A._band_mask

    def recording(q0, q1, k0, k1, window, device):
        widths.append(k1 - k0)
        return band(q0, q1, k0, k1, window, device)

    monkeypatch.setattr(A, "_band_mask", recording)
    q, k, v = qkv(batch=1, length=80)
    got = attend(q, k, v, AttentionPlan(), scale=0.25, window=8)
    want = explicit_attention(q, k, v, torch.zeros(1, 80, dtype=torch.long), window=8, scale=0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert widths and max(widths) <= 2 * 8 - 1


def test_length_one_pieces_return_their_values():
    q, k, v = qkv(batch=1, length=5)
    plan = build_plan(1, 5, position_ids=torch.zeros(1, 5, dtype=torch.long))
    assert plan.pieces == (((0, 5, True),),)
    torch.testing.assert_close(attend(q, k, v, plan, scale=0.3), A.repeat_kv(v, 2).transpose(1, 2))


# ----------------------------------------------------------------------------- packed rows in one launch
PACKED = [case for case in CASES if CASES[case][0] is not None]


def _graph_has(t, name: str) -> bool:
    """Whether an autograd node whose class name contains ``name`` produced ``t``."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def test_packed_backend_switch(kernel_mode, monkeypatch):
    q, _, _ = qkv()
    monkeypatch.delenv(A.PACKED_ATTENTION_ENV, raising=False)
    kernel_mode("auto")
    assert A.packed_attention_backend(q) == "pieces"  # CPU tensors: the Triton kernels do not run
    kernel_mode("reference")
    assert A.packed_attention_backend(q) == "pieces"
    kernel_mode("triton")
    assert A.packed_attention_backend(q) == "varlen"
    assert A.packed_attention_backend(q, dropout=0.1) == "pieces"  # only SDPA draws attention dropout
    assert A.packed_attention_backend(torch.zeros(1, 1, 2, 512)) == "pieces"  # heads wider than the kernel
    monkeypatch.setenv(A.PACKED_ATTENTION_ENV, "pieces")
    assert A.packed_attention_backend(q) == "pieces"
    monkeypatch.setenv(A.PACKED_ATTENTION_ENV, "flex")
    assert A.packed_attention_backend(q) == "pieces"  # FlexAttention only on CUDA (compiled)
    monkeypatch.setenv(A.PACKED_ATTENTION_ENV, "flash")
    assert A.packed_attention_backend(q) == "varlen"  # torch's FlashAttention varlen is CUDA's: Triton's kernel
    monkeypatch.setenv(A.PACKED_ATTENTION_ENV, "varlen")
    kernel_mode("reference")
    assert A.packed_attention_backend(q) == "pieces"
    monkeypatch.setenv(A.PACKED_ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match=A.PACKED_ATTENTION_ENV):
        A.packed_attention_backend(q)


def test_packed_index_lays_rows_end_to_end():
    pos = torch.tensor([[0, 1, 2, 0, 0, 0, 1], [0, 1, 2, 3, 4, 0, 1]])
    plan = build_plan(2, 7, position_ids=pos)
    index = A.packed_index(plan, 2, 7, torch.device("cpu"))
    # row 0: [0, 3), three 1-token pieces, [5, 7); row 1 (offset 7): [7, 12), [12, 14)
    assert index.cu_seqlens.tolist() == [0, 3, 4, 5, 7, 12, 14]
    assert index.bounds[0].tolist() == [0, 0, 0, 3, 4, 5, 5, 7, 7, 7, 7, 7, 12, 12]
    assert index.bounds[1].tolist() == [3, 3, 3, 4, 5, 7, 7, 12, 12, 12, 12, 12, 14, 14]
    assert index.longest == 5
    shared = build_plan(2, 7, position_ids=pos[:1].expand(2, -1))
    assert A.packed_index(shared, 2, 7, torch.device("cpu")).cu_seqlens.tolist() == [0, 3, 4, 5, 7, 10, 11, 12, 14]


@pytest.mark.parametrize("docs", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("length", [16, 17, 18, 19])
def test_packed_index_parts_start_16_bytes_aligned(docs, length):
    """Triton specializes a kernel on each pointer's 16-byte alignment: the index's parts, one copy
    to the device, must stay aligned whatever the number of documents and tokens."""
    cuts = [0] + list(range(length - docs + 1, length)) + [length]  # one long document, then 1-token ones
    plan = AttentionPlan(pieces=(tuple((a, b, False) for a, b in zip(cuts, cuts[1:])),))
    index = A.packed_index(plan, 1, length, torch.device("cpu"))
    assert index.cu_seqlens.numel() == docs + 1 and index.bounds[0].numel() == length
    for t in (index.cu_seqlens, *index.bounds):
        assert t.data_ptr() % 16 == 0


@pytest.mark.parametrize("case", PACKED)
def test_varlen_backend_matches_explicit_masked_attention(kernel_mode, case):
    """The Triton varlen kernel (Triton's interpreter here) behind attend(), forward and backward."""
    kernel_mode("triton")
    positions, window, softcap = CASES[case]
    q, k, v = qkv(grad=True)
    b, _, s, _ = q.shape
    plan = build_plan(b, s, position_ids=torch.tensor(positions).expand(b, -1))
    assert A.packed_attention_backend(q) == "varlen"
    got = attend(q, k, v, plan, scale=0.3, window=window, softcap=softcap)
    assert _graph_has(got, "VarlenAttention")
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = explicit_attention(q2, k2, v2, segment_ids_of(plan, b, s), window=window, softcap=softcap, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    for a, c in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-5)


def test_varlen_backend_rows_packed_differently(kernel_mode):
    kernel_mode("triton")
    q, k, v = qkv(length=9)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 0, 1, 2, 3, 4, 5, 6]])
    plan = build_plan(2, 9, position_ids=pos)
    got = attend(q, k, v, plan, scale=0.25, window=3, softcap=2.0)
    want = explicit_attention(q, k, v, segment_ids_of(plan, 2, 9), window=3, softcap=2.0, scale=0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", PACKED)
def test_flex_backend_matches_explicit_masked_attention(case):
    """The FlexAttention backend's mask and softcap (eager FlexAttention on the CPU; compiled on CUDA)."""
    if not A._flex_available():
        pytest.skip("this torch has no FlexAttention")
    positions, window, softcap = CASES[case]
    q, k, v = qkv()
    b, _, s, _ = q.shape
    plan = build_plan(b, s, position_ids=torch.tensor(positions).expand(b, -1))
    got = A._attend_flex(q, k, v, plan, scale=0.3, window=window, softcap=softcap)
    want = explicit_attention(q, k, v, segment_ids_of(plan, b, s), window=window, softcap=softcap, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_unpacked_softcap_rows_take_the_varlen_kernel(kernel_mode, window):
    """Gemma 2's softcapped attention on unpacked (or right-padded) rows: each row one sequence of
    the varlen kernel wherever the packed backend is varlen."""
    kernel_mode("triton")
    q, k, v = qkv(length=21, grad=True)
    got = attend(q, k, v, AttentionPlan(), scale=0.3, window=window, softcap=1.5)
    assert _graph_has(got, "VarlenAttention")
    want = explicit_attention(q, k, v, torch.zeros(2, 21, dtype=torch.long), window=window, softcap=1.5, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- right-padded rows
def test_padded_plan_as_pieces():
    plan = AttentionPlan(lengths=(6, 3, 0, 5))
    assert plan.as_pieces(4, 6).pieces == (((0, 6, False),), ((0, 3, False), (3, 6, True)), ((0, 6, True),),
                                           ((0, 5, False), (5, 6, True)))
    assert not plan.as_pieces(4, 6).shared
    same = AttentionPlan(lengths=(4, 4)).as_pieces(2, 6)
    assert same.shared and same.pieces == (((0, 4, False), (4, 6, True)),)
    assert A.plan_fits(plan, 4, 6) and not A.plan_fits(plan, 3, 6) and not A.plan_fits(plan, 4, 5)


def test_padded_rows_switch(kernel_mode, monkeypatch):
    q, _, _ = qkv()
    monkeypatch.delenv(A.PADDED_ATTENTION_ENV, raising=False)
    monkeypatch.delenv(A.PACKED_ATTENTION_ENV, raising=False)
    kernel_mode("triton")
    assert A.padded_attention_backend(q) == "sdpa"  # CPU tensors: SDPA as torch picks it
    assert A.padded_attention_backend(q.to("meta")) == "sdpa"
    monkeypatch.setenv(A.PADDED_ATTENTION_ENV, "varlen")
    assert A.padded_attention_backend(q) == "varlen"
    assert A.padded_attention_backend(q, dropout=0.1) == "sdpa"  # only SDPA draws attention dropout
    kernel_mode("reference")
    assert A.padded_attention_backend(q) == "sdpa"  # packed rows take "pieces" there
    monkeypatch.setenv(A.PADDED_ATTENTION_ENV, "flash")
    assert A.padded_attention_backend(q) == "sdpa"  # SDPA's flash backend is CUDA's
    monkeypatch.setenv(A.PADDED_ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match=A.PADDED_ATTENTION_ENV):
        A.padded_attention_backend(q)


def test_collated_rows_carry_their_lengths():
    """A collator's batch (plan_batch) carries lengths even unpadded: its length varies by batch."""
    batch = A.plan_batch({"input_ids": torch.zeros(1, 5, dtype=torch.long), "attention_mask": torch.ones(1, 5)})
    assert batch[A.PLAN_KEY] == AttentionPlan(lengths=(5,))
    batch = A.plan_batch({"input_ids": torch.zeros(2, 4, dtype=torch.long)})
    assert batch[A.PLAN_KEY] == AttentionPlan(lengths=(4, 4))
    pos = torch.tensor([[0, 1, 0, 1]])
    assert A.plan_batch({"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": pos})[A.PLAN_KEY] \
        == AttentionPlan(pieces=(((0, 2, False), (2, 4, False)),))


@pytest.mark.parametrize("window, softcap", [(None, None), (5, None), (None, 1.5)])
def test_padded_rows_take_the_varlen_kernel(kernel_mode, window, softcap, monkeypatch):
    """Right-padded rows on the varlen kernel (``NBTUNE_PADDED_ATTENTION=varlen``; Triton's
    interpreter here): the real tokens' outputs
    and the gradients they send back equal one causal attention over each row's real tokens."""
    kernel_mode("triton")
    monkeypatch.setenv(A.PADDED_ATTENTION_ENV, "varlen")
    q, k, v = qkv(length=13, grad=True)
    mask = torch.tensor([[1] * 13, [1] * 7 + [0] * 6])
    plan = build_plan(2, 13, attention_mask=mask)
    got = attend(q, k, v, plan, scale=0.3, window=window, softcap=softcap)
    assert _graph_has(got, "VarlenAttention")
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = explicit_attention(q2, k2, v2, torch.zeros(2, 13, dtype=torch.long), window=window, softcap=softcap,
                              scale=0.3)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(got) * real[:, :, None, None]  # the pads' outputs carry no loss
    got.backward(grad)
    want.backward(grad)
    for a, c in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", PACKED)
def test_gpu_flash_backend_matches_explicit_masked_attention(case, dtype, kernel_mode, monkeypatch):
    """NBTUNE_PACKED_ATTENTION=flash: torch's FlashAttention varlen kernels behind attend() (softcapped
    cases take Triton's varlen kernel), forward and backward against fp64 explicit attention."""
    if A._torch_varlen() is None:
        pytest.skip("this torch's varlen_attn takes no window_size / enable_gqa")
    kernel_mode("auto")
    monkeypatch.setenv(A.PACKED_ATTENTION_ENV, "flash")
    positions, window, softcap = CASES[case]
    q, k, v = (t.cuda().requires_grad_() for t in qkv(length=29, dim=64, dtype=dtype))
    b, _, s, _ = q.shape
    plan = build_plan(b, s, position_ids=torch.tensor(positions).expand(b, -1))
    assert A.packed_attention_backend(q) == "flash"
    got = attend(q, k, v, plan, scale=0.3, window=window, softcap=softcap)
    assert _graph_has(got, "VarlenAttention") == (softcap is not None)  # Triton's kernel only under a softcap
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = explicit_attention(q2, k2, v2, segment_ids_of(plan, b, s).cuda(), window=window, softcap=softcap,
                              scale=0.3)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    for a, c in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, c.grad, rtol=2e-2, atol=3e-2)


def test_sdpa_without_cudnn_keeps_what_the_process_turned_off():
    """The "flash" choice leaves out cuDNN and nothing the process already disabled (the T4
    emulation allows only the memory-efficient kernel): inside, flash stays off too."""
    cuda = torch.backends.cuda
    before = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
              cuda.cudnn_sdp_enabled())
    cuda.enable_flash_sdp(False)
    try:
        with A._without_cudnn():
            assert not cuda.cudnn_sdp_enabled() and not cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled()
        assert not cuda.flash_sdp_enabled() and cuda.cudnn_sdp_enabled() == before[3]
    finally:
        cuda.enable_flash_sdp(before[0])
    with A._without_cudnn():
        assert cuda.flash_sdp_enabled() == before[0] and not cuda.cudnn_sdp_enabled()
