"""kernels/_launch.py: the cached Triton launch path must run exactly what ``kernel[grid]`` runs."""
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
