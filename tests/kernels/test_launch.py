"""nbtune/kernels/_launch.py: the cached Triton launch path must run exactly what ``kernel[grid]`` runs."""
import weakref

import pytest
import torch

from nbtune.kernels import _launch
from nbtune.kernels.glu import ACTIVATIONS, glu_forward_2d, glu_reference


def test_specialization_key_separates_what_triton_specializes_on():
    base = torch.zeros(64, dtype=torch.float16)
    aligned, shifted = base[:32], base[1:33]  # 2-byte offset: not 16-byte aligned
    assert _launch._arg_key(aligned) != _launch._arg_key(shifted)
    assert _launch._arg_key(aligned) != _launch._arg_key(aligned.float())
    # integers: 1 (a constant to Triton), multiples of 16, 32- vs 64-bit
    keys = {_launch._arg_key(v) for v in (1, 16, 17, 2**31, -5)}
    assert len(keys) == 5
    assert _launch._arg_key(32) == _launch._arg_key(48)
    assert _launch._arg_key(True) != _launch._arg_key(1)
    assert _launch._arg_key(0.5) == _launch._arg_key(2.0)
    with pytest.raises(TypeError):
        _launch._arg_key(object())


def test_hook_chain_without_hooks_counts_as_none():
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert _launch._hook(None) is None
    assert _launch._hook(Chain([])) is None
    chain = Chain([print])
    assert _launch._hook(chain) is chain


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cached_launches_match_the_reference_and_hit_the_cache(dtype):
    torch.manual_seed(0)
    _launch.clear_cache()
    act = ACTIVATIONS["swiglu"]
    for step in range(3):  # first call compiles through kernel[grid]; later ones take the cached path
        gate = torch.randn(37, 1000, device="cuda", dtype=dtype)
        up = torch.randn(37, 1000, device="cuda", dtype=dtype)
        out = glu_forward_2d(gate, up, act)
        expected = glu_reference(gate.float(), up.float(), act).to(dtype)
        torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    assert len(_launch._compiled) == 1
    # a misaligned view is another specialization: compiled anew, still right
    big_gate = torch.randn(37 * 1000 + 1, device="cuda", dtype=dtype)
    gate = big_gate[1:].view(37, 1000)
    out = glu_forward_2d(gate, up, act)
    torch.testing.assert_close(out, glu_reference(gate.float(), up.float(), act).to(dtype), rtol=1e-2, atol=1e-2)
    assert len(_launch._compiled) == 2


def _glu_relauncher(gate, up, act):
    """A Relauncher of the GLU forward kernel over fixed gate/up whose output (slot 2) varies."""
    from nbtune.kernels.glu import _glu_forward_kernel, _launch_config

    rows, n_cols = gate.shape
    grid, block_rows, block_cols, warps = _launch_config(rows, n_cols)
    args = (gate, up, None, rows, n_cols, gate.stride(0), up.stride(0), n_cols)
    meta = dict(ACTIVATION=act, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps)
    return _launch.Relauncher(_glu_forward_kernel, grid, args, 2, meta)


def _relaunch_matches_reference(device, dtype):
    torch.manual_seed(0)
    act = ACTIVATIONS["swiglu"]
    gate = torch.randn(5, 70, device=device, dtype=dtype)
    up = torch.randn(5, 70, device=device, dtype=dtype)
    expected = glu_reference(gate.float(), up.float(), act).to(dtype)
    relaunch = _glu_relauncher(gate, up, act)
    outs = []
    for _ in range(3):  # a fresh output each time, as NF4 dequantization does
        out = torch.full((5, 70), float("nan"), device=device, dtype=dtype)
        relaunch(out)
        outs.append(out)
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    return relaunch, gate, up, expected


def test_relauncher_substitutes_its_one_varying_argument():
    """CPU (Triton's interpreter: every call takes ``launch``): each call writes the tensor it is
    given, the fixed arguments stay bound."""
    relaunch, *_ = _relaunch_matches_reference("cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    assert relaunch.args[2] is None  # the template keeps no reference to an output


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relauncher_binds_after_the_first_launch_and_falls_back_on_a_new_specialization(dtype):
    _launch.clear_cache()
    relaunch, gate, up, expected = _relaunch_matches_reference("cuda", dtype)
    assert relaunch.compiled is not None and relaunch.dtype == dtype
    # the bound arguments keep no output alive: a relaunched buffer is freed when its owner drops it
    out = torch.empty(5, 70, device="cuda", dtype=dtype)
    relaunch(out)
    alive = weakref.ref(out)
    del out
    assert alive() is None and relaunch.bound[2] is None
    # a 2-byte-offset output is another specialization for Triton: it takes launch(), still right
    big = torch.empty(5 * 70 + 1, device="cuda", dtype=dtype)
    shifted = big[1:].view(5, 70)
    relaunch(shifted)
    torch.testing.assert_close(shifted, expected, rtol=1e-2, atol=1e-2)
    assert len(_launch._compiled) == 2


@pytest.mark.gpu
def test_nf4_dequantize_through_its_plan_stays_bit_exact():
    """The per-weight plan's relaunches (fresh outputs, several calls) equal bitsandbytes' dequant."""
    import bitsandbytes.functional as bnbF

    from nbtune.kernels.nf4 import dequantize_base

    torch.manual_seed(0)
    w = torch.randn(1031, 4096, device="cuda", dtype=torch.float16)
    packed, state = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    packed.quant_state = state
    expected = bnbF.dequantize_4bit(packed, state)
    outs = [dequantize_base(packed, torch.float16) for _ in range(4)]
    for out in outs:
        assert torch.equal(out, expected)
    plans = state.__dict__["_nbtune_plans"]
    assert len(plans) == 1 and next(iter(plans.values())).relaunch.compiled is not None
