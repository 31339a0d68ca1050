"""linear_logprobs: the chunked-torch path and the Triton path (Triton's interpreter on CPU) vs the
full-logits reference, forward (log-probs and the entropy / mean-logit / top-1 stats) and backward
(hidden, LM head weight, bias) under per-token upstream gradients, as DPO gives them."""
import pytest
import torch
import torch.nn.functional as F

import importlib

ll = importlib.import_module("nbtune.kernels.linear_logprobs")
from nbtune.kernels import linear_logprobs
from nbtune.kernels.linear_logprobs import linear_logprobs_reference


def make_inputs(n, h, v, seed, weight_grad=False, with_bias=False, ignore_frac=0.3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2.0 / h**0.5)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    bias = (torch.randn(v, generator=gen) * 0.5).to(dtype).requires_grad_() if with_bias else None
    return (hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(weight_grad), labels, bias)


def run(fn, hidden, weight, labels, bias=None, seed=1, **kw):
    """Outputs of ``fn`` and the gradients of sum(g * log_probs) for a random per-token g."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    out = fn(hidden, weight, labels, bias=bias, stats=True, **kw)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed))
    (out.log_probs * g).sum().backward()
    grads = [None if t is None or t.grad is None else t.grad.clone() for t in (hidden, weight, bias)]
    return out, grads


def assert_same(a, b, tol):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.log_probs, out_b.log_probs, rtol=tol, atol=tol)
    torch.testing.assert_close(out_a.entropy, out_b.entropy, rtol=tol, atol=tol)
    torch.testing.assert_close(out_a.mean_logits, out_b.mean_logits, rtol=tol, atol=tol)
    assert torch.equal(out_a.is_top1, out_b.is_top1)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)


def test_reference_is_log_softmax_gathered():
    hidden, weight, labels, _ = make_inputs(20, 16, 50, seed=0)
    out = linear_logprobs_reference(hidden, weight, labels, stats=True)
    logits = hidden.double() @ weight.double().T
    logp = torch.log_softmax(logits, -1)
    valid = labels != -100
    expect = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * valid
    torch.testing.assert_close(out.log_probs.double(), expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.entropy.double(), -(logp.exp() * logp).sum(-1) * valid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean_logits.double(), logits.mean(-1) * valid, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1, (logits.argmax(-1) == labels) & valid)
    assert (out.log_probs[~valid] == 0).all() and (out.log_probs[valid] < 0).all()
    # the negative log-probability is the unreduced cross-entropy
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(-out.log_probs.double(), ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_grad,with_bias,softcap", [(False, False, None), (True, True, None),
                                                           (False, False, 5.0), (True, False, 3.0)])
def test_chunked_torch_matches_the_reference(monkeypatch, kernel_mode, weight_grad, with_bias, softcap):
    kernel_mode("auto")  # CPU tensors: the chunked torch path
    monkeypatch.setattr(ll, "FORCE_CHUNK_ROWS", 7)  # several chunks, the last one short
    inputs = make_inputs(31, 24, 97, seed=2, weight_grad=weight_grad, with_bias=with_bias)
    got = run(linear_logprobs, *inputs, softcap=softcap)
    want = run(linear_logprobs_reference, *inputs, softcap=softcap)
    assert_same(got, want, 1e-5)


@pytest.mark.parametrize("weight_grad,with_bias,softcap", [(False, False, None), (True, True, None),
                                                           (False, False, 4.0), (False, True, 2.5)])
def test_triton_matches_the_reference(monkeypatch, kernel_mode, weight_grad, with_bias, softcap):
    kernel_mode("triton")  # Triton's interpreter on a machine without a GPU
    monkeypatch.setattr(ll, "FORCE_CHUNK_ROWS", 8)
    monkeypatch.setattr(ll, "FORCE_BLOCK_V", 64)  # 97 classes: two vocab blocks, the second partial
    inputs = make_inputs(19, 16, 97, seed=3, weight_grad=weight_grad, with_bias=with_bias)
    got = run(linear_logprobs, *inputs, softcap=softcap)
    want = run(linear_logprobs_reference, *inputs, softcap=softcap)
    assert_same(got, want, 1e-5)


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_batched_shapes_ignored_rows_and_no_stats(monkeypatch, kernel_mode, mode):
    kernel_mode(mode)
    monkeypatch.setattr(ll, "FORCE_CHUNK_ROWS", 5)
    hidden, weight, labels, _ = make_inputs(24, 16, 40, seed=4)
    hidden3, labels3 = hidden.detach().view(2, 12, 16).requires_grad_(), labels.view(2, 12).clone()
    labels3[1] = -100  # a sequence with nothing to score: zeros and a zero gradient
    logp = linear_logprobs(hidden3, weight, labels3)
    assert logp.shape == (2, 12) and logp.dtype == torch.float32
    assert (logp[1] == 0).all()
    want = linear_logprobs_reference(hidden3, weight, labels3)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    logp.sum().backward()
    assert (hidden3.grad[1] == 0).all() and hidden3.grad[0].abs().sum() > 0


def test_triton_backward_runs_once(kernel_mode):
    kernel_mode("triton")
    hidden, weight, labels, _ = make_inputs(6, 8, 30, seed=5)
    logp = linear_logprobs(hidden, weight, labels)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        logp.sum().backward()


def test_sequence_sums_give_dpo_gradients(monkeypatch, kernel_mode):
    """DPO's use: per-sequence sums of the completion tokens' log-probs, a sigmoid loss on the
    chosen-minus-rejected difference; the gradient through the kernel is autograd's through the
    full logits."""
    kernel_mode("auto")
    monkeypatch.setattr(ll, "FORCE_CHUNK_ROWS", 9)
    hidden, weight, labels, _ = make_inputs(4 * 10, 16, 60, seed=6, ignore_frac=0.0)
    labels = labels.view(4, 10)
    labels[:, :4] = -100  # the prompt

    def dpo_loss(fn):
        hidden.grad = None
        seq = fn(hidden.view(4, 10, 16), weight, labels).sum(-1)
        chosen, rejected = seq.chunk(2)
        loss = -F.logsigmoid(0.1 * (chosen - rejected)).mean()
        loss.backward()
        return loss.detach(), hidden.grad.clone()

    loss, grad = dpo_loss(linear_logprobs)
    loss_ref, grad_ref = dpo_loss(linear_logprobs_reference)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    hidden, weight, labels, _ = make_inputs(5, 8, 20, seed=7)
    with pytest.raises(ValueError, match="does not match weight"):
        linear_logprobs(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="token for token"):
        linear_logprobs(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="softcap"):
        linear_logprobs(hidden, weight, labels, softcap=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_on_gpu_matches_the_reference_at_a_real_head(dtype):
    """SmolLM2's head (H=576, V=49152), 2 x 2 sequences of 512 tokens, in 16-bit: the Triton path
    against the fp32 reference on the same 16-bit inputs."""
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(4, 512, 576, generator=gen).to("cuda", dtype).requires_grad_()
    weight = (torch.randn(49152, 576, generator=gen) * 576**-0.5).to("cuda", dtype)
    labels = torch.randint(0, 49152, (4, 512), generator=gen).cuda()
    labels[:, :200] = -100
    g = torch.randn(4, 512, generator=gen).cuda()
    out = linear_logprobs(hidden, weight, labels, stats=True)
    (out.log_probs * g).sum().backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    ref = linear_logprobs_reference(hidden, weight, labels, stats=True)
    (ref.log_probs * g).sum().backward()
    torch.testing.assert_close(out.log_probs, ref.log_probs, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad.float(), hidden.grad.float(), rtol=5e-2, atol=5e-3)
