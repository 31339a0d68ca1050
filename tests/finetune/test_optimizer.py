"""nbtune.train.optimizer: bitsandbytes' optimizers stepping without a device sync per parameter.

Same kernels and state layout as bitsandbytes' own step: identical parameters and states after
several steps (8-bit states for the large tensor, 32-bit for the small one, as bitsandbytes picks
by size), interchangeable state dicts, no synchronization; paged optimizers keep bitsandbytes' step.
"""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.optim import optimizer as bnb_optimizer  # noqa: E402

from nbtune.train.optimizer import register_embedding_overrides, sync_free  # noqa: E402


def _params(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # 8192 values: 8-bit blockwise states; 100: below bitsandbytes' min_8bit_size, 32-bit states
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in (8192, 100)]


def _train(cls, device, steps=3, **kwargs):
    params = _params(device)
    opt = cls(params, lr=1e-2, weight_decay=0.01, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
    return params, opt


def _count_syncs(monkeypatch):
    calls = []
    original = bnb_optimizer.sync_gpu
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: (calls.append(t.device.type), original(t)))
    return calls


def _same_states(a, b):
    for pa, pb in zip(a.state.values(), b.state.values()):
        assert pa.keys() == pb.keys()
        for key in pa:
            va, vb = pa[key], pb[key]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, key


@pytest.mark.parametrize("cls", [bnb.optim.AdamW8bit, bnb.optim.AdamW])
def test_same_update_and_states_as_bitsandbytes_without_syncs(cls, monkeypatch):
    syncs = _count_syncs(monkeypatch)
    ours, ours_opt = _train(sync_free(cls), "cpu")
    assert syncs == []
    theirs, theirs_opt = _train(cls, "cpu")
    assert len(syncs) == 3 * 2  # bitsandbytes: one per parameter per step (a no-op on CPU, a device wait on GPU)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    _same_states(ours_opt, theirs_opt)
    assert isinstance(ours_opt, cls) and type(ours_opt).__name__ == f"SyncFree{cls.__name__}"


def test_state_dicts_are_interchangeable():
    theirs, theirs_opt = _train(bnb.optim.AdamW8bit, "cpu", steps=2)
    params = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    ours_opt = sync_free(bnb.optim.AdamW8bit)(params, lr=1e-2, weight_decay=0.01)
    ours_opt.load_state_dict(theirs_opt.state_dict())
    gen = torch.Generator().manual_seed(7)
    for ps, opt in ((params, ours_opt), (theirs, theirs_opt)):
        gen.manual_seed(7)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    for a, b in zip(params, theirs):
        assert torch.equal(a, b)


def test_paged_keeps_bitsandbytes_step_and_other_classes_pass_through(monkeypatch):
    assert sync_free(torch.optim.AdamW) is torch.optim.AdamW
    assert sync_free(bnb.optim.AdamW8bit) is sync_free(bnb.optim.AdamW8bit)  # one subclass per class
    opt = sync_free(bnb.optim.AdamW)([torch.nn.Parameter(torch.zeros(10))], optim_bits=8, is_paged=True)
    called = []
    monkeypatch.setattr(bnb.optim.AdamW, "step", lambda self, closure=None: called.append(True))
    opt.step()
    assert called == [True]


def test_trainer_picks_the_sync_free_class_for_bitsandbytes_names():
    from trl import SFTConfig

    from nbtune.train.run import _trainer_class

    trainer_cls = _trainer_class()
    for name, bits, paged in (("adamw_bnb_8bit", 8, False), ("paged_adamw_8bit", 8, True)):
        cls, kwargs = trainer_cls.get_optimizer_cls_and_kwargs(SFTConfig(output_dir="/tmp/x", optim=name, use_cpu=True))
        assert issubclass(cls, bnb.optim.AdamW) and cls.__name__ == "SyncFreeAdamW"
        assert kwargs["optim_bits"] == bits and kwargs["is_paged"] == paged
    cls, _ = trainer_cls.get_optimizer_cls_and_kwargs(SFTConfig(output_dir="/tmp/x", optim="adamw_torch", use_cpu=True))
    assert cls is torch.optim.AdamW


def test_trainable_embeddings_keep_32_bit_states():
    model = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 64))
    opt = sync_free(bnb.optim.AdamW8bit)(model.parameters(), lr=1e-3)
    assert register_embedding_overrides(model, opt) == 1
    model[0].weight.grad = torch.randn_like(model[0].weight)
    model[1].weight.grad = torch.randn_like(model[1].weight)
    opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32  # 19,200 values: 8-bit unless overridden
    assert register_embedding_overrides(model, torch.optim.SGD(model.parameters(), lr=0.1)) == 0


@pytest.mark.gpu
def test_gpu_same_update_without_device_waits(monkeypatch):
    """On CUDA: bitsandbytes waits for the device after every parameter; the sync-free step does not
    synchronize at all and gives the same bits."""
    waits = []
    original = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (waits.append(1), original(*a, **k)))
    ours, _ = _train(sync_free(bnb.optim.AdamW8bit), "cuda")
    assert waits == []
    theirs, _ = _train(bnb.optim.AdamW8bit, "cuda")
    assert len(waits) == 3 * 2
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
