"""nbtune.train.optimizer: bitsandbytes' optimizers stepping without a device sync per parameter,
with 8-bit updates batched over parameters.

Same kernels and state layout as bitsandbytes' own step: identical parameters and states after
several steps (8-bit states for the large tensor, 32-bit for the small one, as bitsandbytes picks
by size), interchangeable state dicts, no synchronization; paged optimizers keep bitsandbytes' step.
Batching: on a mix of LoRA-like shapes, odd sizes, small tensors, two groups, a parameter without
gradient for a step and a learning-rate change, the batched step gives bitsandbytes' bits with one
update call per chunk of a bucket (counted), and its state dicts (views into flat buffers) load
into bitsandbytes and back, through torch.save.
"""
import io

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.optim import optimizer as bnb_optimizer  # noqa: E402

from bitsandbytes.optim import GlobalOptimManager  # noqa: E402

from nbtune.train.optimizer import register_embedding_overrides, sync_free  # noqa: E402


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Bit-identity needs a deterministic reference: bitsandbytes' CPU backend (OpenMP, shared with
    torch's thread pool) gave run-to-run differences in the last bit of parameters, in the second
    thread's half of a tensor, on a loaded 2-core machine (2 of 24 plain AdamW8bit runs); on one
    thread it gave none (0 of 24)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_override_registry():
    """bitsandbytes' config overrides live in a process-wide singleton keyed by (group, index):
    each test starts and ends without any."""
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


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

    from nbtune.train.trainer import sft_trainer_class

    trainer_cls = sft_trainer_class()
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


# --- batched 8-bit updates -------------------------------------------------------------------------

# Two groups of LoRA-like shapes. Group 0: A, B, C, D batchable (8-bit states, whole 256-blocks),
# E 8-bit but 6000 values (not whole blocks: per parameter), F 40 values (32-bit states).
# Group 1: G, H, I batchable. B has no gradient at step 2, so from step 3 on its step count differs.
MIX_SHAPES = ([(8, 512), (512, 8), (24, 256), (16, 512), (300, 20), (40,)], [(8, 512), (64, 64), (24, 256)])
NO_GRAD = {2: {(0, 1)}}  # step -> (group, index) without gradient
CHUNK = 16384  # bucket of group 0 (4096 + 4096 + 6144 + 8192 values) splits: [A, B, C] [D]


def _mix_params(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
            for shapes in MIX_SHAPES]


def _mix_optimizer(cls, groups, **kwargs):
    return cls([{"params": groups[0], "lr": 1e-2, "weight_decay": 0.01},
                {"params": groups[1], "lr": 3e-3, "weight_decay": 0.0}], **kwargs)


def _mix_grads(steps, device, dtype):
    """The same gradients for every optimizer: per step, per group, per parameter (None: no grad)."""
    gen = torch.Generator().manual_seed(1)
    return [[[None if (g, i) in NO_GRAD.get(step, ()) else torch.randn(s, generator=gen).to(device, dtype)
              for i, s in enumerate(shapes)] for g, shapes in enumerate(MIX_SHAPES)]
            for step in range(1, steps + 1)]


def _run_mix_step(opt, groups, step, grads):
    """Step ``step`` (1-based): gradients set, lr of group 0 as a scheduler would set it, step."""
    for params, step_grads in zip(groups, grads[step - 1]):
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
    opt.param_groups[0]["lr"] = 1e-2 * (1.0 - 0.2 * (step - 1))
    opt.step()


def _same_bits(ours, theirs, groups_ours, groups_theirs):
    for params_a, params_b in zip(groups_ours, groups_theirs):
        for a, b in zip(params_a, params_b):
            assert torch.equal(a, b)
            sa, sb = ours.state[a], theirs.state[b]
            assert sa.keys() == sb.keys() and sa["step"] == sb["step"]
            for key in sa:
                if isinstance(sa[key], torch.Tensor):
                    assert sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key]), key


def _count_update_calls(count_calls):
    """Counts of bitsandbytes' update kernels called (8-bit blockwise, 32-bit), since the last reset."""
    import bitsandbytes.functional as F

    return count_calls(F, {"optimizer_update_8bit_blockwise": "8bit", "optimizer_update_32bit": "32bit"})


# update calls per step, 8-bit (batched chunks + per-parameter) and 32-bit:
# step 1: group 0 [A B C] [D] + E, group 1 [G H I]       -> 4 (bitsandbytes: 8)
# step 2: B has no gradient: [A C] [D] + E, [G H I]        -> 4 (bitsandbytes: 7)
# steps 3-4: B one step behind, on its own: [A C] [D] + B + E, [G H I] -> 5 (bitsandbytes: 8)
# F (32-bit states) is one 32-bit call every step.
EXPECTED_CALLS = [(4, 1), (4, 1), (5, 1), (5, 1)]
BNB_CALLS = [(8, 1), (7, 1), (8, 1), (8, 1)]


def _check_mix(device, dtype, monkeypatch, count_calls, cls=bnb.optim.AdamW8bit, **kwargs):
    monkeypatch.setattr(sync_free(cls), "max_chunk_numel", CHUNK)
    calls = _count_update_calls(count_calls)
    grads = _mix_grads(4, device, dtype)
    ours_groups, theirs_groups = _mix_params(device, dtype), _mix_params(device, dtype)
    ours = _mix_optimizer(sync_free(cls), ours_groups, **kwargs)
    theirs = _mix_optimizer(cls, theirs_groups, **kwargs)
    layouts = []
    for step in range(1, 5):
        calls.update({"8bit": 0, "32bit": 0})
        _run_mix_step(ours, ours_groups, step, grads)
        assert (calls["8bit"], calls["32bit"]) == EXPECTED_CALLS[step - 1], step
        layouts.append(ours._layout)
        calls.update({"8bit": 0, "32bit": 0})
        _run_mix_step(theirs, theirs_groups, step, grads)
        assert (calls["8bit"], calls["32bit"]) == BNB_CALLS[step - 1], step
        _same_bits(ours, theirs, ours_groups, theirs_groups)
    # a new layout when B drops out (step 2) and when it comes back (step 3); none for the lr change
    assert layouts[0] is not layouts[1] and layouts[1] is not layouts[2] and layouts[2] is layouts[3]
    # states of bucketed parameters are views into one flat buffer per state; B, alone since step 3,
    # owns its states (copied out of the old buffers, which are gone)
    a, b, c, d = ours_groups[0][:4]
    base = ours.state[a]["state1"]._base
    assert base is not None and all(ours.state[p]["state1"]._base is base for p in (c, d))
    assert ours.state[b]["state1"]._base is None
    return ours, ours_groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_step_gives_bitsandbytes_bits_with_one_call_per_chunk(dtype, monkeypatch, count_calls):
    _check_mix("cpu", dtype, monkeypatch, count_calls)


def test_batched_step_for_the_trainers_adamw_with_8_bit_states(monkeypatch, count_calls):
    """transformers' ``adamw_bnb_8bit`` is ``bnb.optim.AdamW(optim_bits=8)``: batched the same way."""
    _check_mix("cpu", torch.float32, monkeypatch, count_calls, bnb.optim.AdamW, optim_bits=8)


def test_learning_rate_and_betas_changes_keep_the_layout(monkeypatch):
    """Hyper-parameters are kernel arguments, read from the group every step: changing them is no
    reason to re-pack, and the update still matches bitsandbytes'."""
    groups, ref_groups = _mix_params("cpu", torch.float32), _mix_params("cpu", torch.float32)
    ours = _mix_optimizer(sync_free(bnb.optim.AdamW8bit), groups)
    theirs = _mix_optimizer(bnb.optim.AdamW8bit, ref_groups)
    gen = torch.Generator().manual_seed(3)
    layouts = []
    for step in range(3):
        for a, b in zip(sum(groups, []), sum(ref_groups, [])):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        for opt in (ours, theirs):
            opt.param_groups[1]["lr"] = 1e-3 * (step + 1)
            opt.param_groups[1]["betas"] = (0.9 - 0.1 * step, 0.99)
            opt.step()
        layouts.append(ours._layout)
        _same_bits(ours, theirs, groups, ref_groups)
    assert layouts[0] is layouts[1] is layouts[2]


def test_state_dicts_round_trip_through_bitsandbytes_and_torch_save(monkeypatch):
    """Batched -> bitsandbytes and bitsandbytes -> batched after 2 steps (through torch.save), 2 more
    steps each: the bits of an optimizer that never went through a round trip."""
    monkeypatch.setattr(sync_free(bnb.optim.AdamW8bit), "max_chunk_numel", CHUNK)
    grads = _mix_grads(4, "cpu", torch.float32)

    def through_file(state_dict):
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    straight_groups = _mix_params("cpu", torch.float32)
    straight = _mix_optimizer(bnb.optim.AdamW8bit, straight_groups)
    for step in range(1, 5):
        _run_mix_step(straight, straight_groups, step, grads)

    for first, second in ((sync_free(bnb.optim.AdamW8bit), bnb.optim.AdamW8bit),
                          (bnb.optim.AdamW8bit, sync_free(bnb.optim.AdamW8bit))):
        groups = _mix_params("cpu", torch.float32)
        opt = _mix_optimizer(first, groups)
        for step in (1, 2):
            _run_mix_step(opt, groups, step, grads)
        saved = through_file(opt.state_dict())
        resumed_groups = [[torch.nn.Parameter(p.detach().clone()) for p in params] for params in groups]
        resumed = _mix_optimizer(second, resumed_groups)
        resumed.load_state_dict(saved)
        for step in (3, 4):
            _run_mix_step(resumed, resumed_groups, step, grads)
        _same_bits(resumed, straight, resumed_groups, straight_groups)


def test_loading_a_state_dict_drops_the_layout_and_repacks(monkeypatch):
    """load_state_dict into a batched optimizer that already has buckets: the loaded states (not the
    old buffers) are what the next step updates."""
    grads = _mix_grads(4, "cpu", torch.float32)
    ref_groups = _mix_params("cpu", torch.float32)
    ref = _mix_optimizer(bnb.optim.AdamW8bit, ref_groups)
    for step in (1, 2):
        _run_mix_step(ref, ref_groups, step, grads)
    groups = [[torch.nn.Parameter(p.detach().clone()) for p in params] for params in ref_groups]
    ours = _mix_optimizer(sync_free(bnb.optim.AdamW8bit), groups)
    for step in (1, 2, 3):  # other states, and a layout of its own
        _run_mix_step(ours, groups, step, grads)
    for params, ref_params in zip(groups, ref_groups):
        for p, q in zip(params, ref_params):
            p.data.copy_(q)
    ours.load_state_dict(ref.state_dict())
    assert ours._layout is None
    for step in (3, 4):
        _run_mix_step(ours, groups, step, grads)
        _run_mix_step(ref, ref_groups, step, grads)
    _same_bits(ours, ref, groups, ref_groups)


def test_fallbacks_one_state_and_unorm_optimizers_step_per_parameter(count_calls):
    """No buckets where the update is not the two-state 8-bit blockwise one: Lion (one state) and
    LAMB (max_unorm > 0: a norm per tensor) make bitsandbytes' calls, one per parameter, and give
    its bits."""
    calls = _count_update_calls(count_calls)
    grads = _mix_grads(2, "cpu", torch.float32)
    for cls in (bnb.optim.Lion8bit, bnb.optim.LAMB8bit):
        ours_params = sum(_mix_params("cpu", torch.float32), [])
        theirs_params = sum(_mix_params("cpu", torch.float32), [])
        ours, theirs = sync_free(cls)(ours_params, lr=1e-3), cls(theirs_params, lr=1e-3)
        for step_grads in grads:
            counts = []
            for opt, params in ((ours, ours_params), (theirs, theirs_params)):
                calls.update({"8bit": 0, "32bit": 0})
                for p, g in zip(params, sum(step_grads, [])):
                    p.grad = None if g is None else g.clone()
                opt.step()
                counts.append(dict(calls))
            with_grad = sum(g is not None for g in sum(step_grads, []))
            assert counts[0] == counts[1] and sum(counts[0].values()) == with_grad, cls
        for a, b in zip(ours_params, theirs_params):
            assert torch.equal(a, b)
            assert ours.state[a]["step"] == theirs.state[b]["step"]
            assert torch.equal(ours.state[a]["state1"], theirs.state[b]["state1"])
        assert getattr(ours, "_layout", None) is None or ours._layout.buckets == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_batched_step_bits_calls_and_no_sync(dtype, monkeypatch, count_calls):
    """On CUDA: bitsandbytes' bits and the expected number of update calls with batching, and steps
    (a re-pack included) that never synchronize the device."""
    _check_mix("cuda", dtype, monkeypatch, count_calls)

    monkeypatch.setattr(sync_free(bnb.optim.AdamW8bit), "max_chunk_numel", CHUNK)
    grads = _mix_grads(4, "cuda", dtype)
    groups = _mix_params("cuda", dtype)
    opt = _mix_optimizer(sync_free(bnb.optim.AdamW8bit), groups)
    _run_mix_step(opt, groups, 1, grads)  # first step: bitsandbytes copies its quantization maps to the device
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (2, 3, 4):  # a layout change at 2 and 3, the same layout at 4
            _run_mix_step(opt, groups, step, grads)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
