"""Launching a ``@triton.jit`` kernel with little host time: ``launch(kernel, grid, *args, **meta)``.

``kernel[grid](*args, **meta)`` re-does Triton's dispatch bookkeeping at every call: binding the
arguments, specializing each one, building the cache key, checking the kernel's globals. On the
H200 that is 50-80 µs of Python per launch, and a training step of an 8B model launches ~1,000
Triton kernels from Python that must keep ahead of the GPU (benchmarks/NOTES.md: the GPU idled on
host time). Here the first call with a given *specialization* goes through ``kernel[grid]``, which
compiles (or finds) the kernel and returns it; later calls with the same specialization call that
compiled kernel's launcher directly, with the same arguments Triton's own ``JITFunction.run``
passes it, so what runs on the GPU is the same.

The specialization key is at least as fine as Triton's: per tensor its dtype and whether its
address is 16-byte aligned; per integer whether it is 1, a multiple of 16 and which integer type
holds it; per float / bool / None its type; the constexpr and launch options by value; the
current device. Anything the fast path cannot vouch for (the interpreter, a kernel with pre-run
hooks, a Triton without the launcher API this relies on, an argument of another kind) takes
``kernel[grid]`` as before.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    from triton.runtime.jit import JITFunction

    try:
        from triton import knobs as _knobs

        _RUNTIME_KNOBS = _knobs.runtime
    except Exception:  # pragma: no cover - Triton before 3.3 (no knobs): no fast path
        _RUNTIME_KNOBS = None
    _VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    # 3.3+ passes every bound argument (constexprs included) to the compiled launcher
    FAST_PATH = _RUNTIME_KNOBS is not None and _VERSION >= (3, 3)
else:  # pragma: no cover
    FAST_PATH = False

_INT32 = (-(2**31), 2**31 - 1)
# Triton decides interpreter or compiler when a kernel is defined (at import), so read it once too
_INTERPRETING = interpreting()
_compiled: dict = {}  # key -> (CompiledKernel, constexpr values in parameter order)
_plans: dict = {}     # kernel -> names of the parameters after the positional ones, or None (no fast path)


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return (bool, a)
    if isinstance(a, int):
        return (int, a == 1, a % 16 == 0, _INT32[0] <= a <= _INT32[1], a >= 0)
    if isinstance(a, float):
        return float
    if a is None:
        return None
    raise TypeError(type(a).__name__)


def _param_names(kernel, n_positional: int, meta: dict):
    """The names of the kernel's parameters after the positional ones, all given in ``meta``;
    None when the fast path cannot serve this kernel."""
    plan = _plans.get(kernel, False)
    if plan is not False:
        return plan
    plan = None
    if isinstance(kernel, JITFunction) and not getattr(kernel, "pre_run_hooks", None):
        names = list(kernel.arg_names)[n_positional:]
        if all(name in meta for name in names):
            plan = tuple(names)
    _plans[kernel] = plan
    return plan


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, with Triton's per-call dispatch skipped after the first
    call of each specialization. ``args``: the leading parameters in order; ``meta``: every other
    parameter by name (constexprs) plus launch options (``num_warps``, ...)."""
    if not FAST_PATH or _INTERPRETING:
        return kernel[grid](*args, **meta)
    try:
        key = (kernel, torch.cuda.current_device(), tuple(map(_arg_key, args)), tuple(meta.items()))
        entry = _compiled.get(key)
    except TypeError:  # an argument kind (or an unhashable option) the key does not cover
        return kernel[grid](*args, **meta)
    if entry is None:
        names = _param_names(kernel, len(args), meta)
        compiled = kernel[grid](*args, **meta)
        if names is not None:  # the constexpr values, in parameter order, are part of the key
            _compiled[key] = (compiled, tuple(meta[name] for name in names))
        return compiled
    compiled, tail = entry
    _run(compiled, grid, key[1], args + tail)
    return compiled


def _run(compiled, grid, device: int, bound):
    """Launch ``compiled`` over ``grid`` (1 to 3 entries) on ``device``'s current stream with the
    arguments ``bound`` (positional ones, then the constexprs), as Triton's own ``JITFunction.run``
    does (launch hooks see the grid as given)."""
    stream = torch._C._cuda_getCurrentRawStream(device)
    enter, exit_ = _hook(_RUNTIME_KNOBS.launch_enter_hook), _hook(_RUNTIME_KNOBS.launch_exit_hook)
    metadata = compiled.launch_metadata(grid, stream, *bound) if enter is not None else None
    g0, g1, g2 = tuple(grid) + (1,) * (3 - len(grid))
    compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, metadata, enter, exit_, *bound)


class Relauncher:
    """One kernel launched again and again with the same arguments but one tensor (a fresh output
    buffer, say): ``relaunch = Relauncher(kernel, grid, args, slot, meta)``, then ``relaunch(t)``
    runs ``kernel[grid](*args with args[slot] = t, **meta)``.

    The first call goes through :func:`launch`; later ones call the compiled kernel's launcher
    with the arguments bound then, so a launch costs one C call and no specialization key at all:
    the fixed arguments cannot have changed, and the varying tensor is checked for what Triton
    specializes a tensor on (its dtype and 16-byte alignment) and takes :func:`launch` when it
    differs from the first one. NF4 dequantization of a 4-bit weight (~640 launches per llama3-8b
    training step, the same weight tensors every time, a fresh output each) goes through here.
    """

    __slots__ = ("kernel", "grid", "args", "slot", "meta", "bound", "compiled", "device", "dtype")

    def __init__(self, kernel, grid, args, slot: int, meta: dict):
        self.kernel, self.grid, self.args, self.slot, self.meta = kernel, tuple(grid), tuple(args), slot, meta
        self.bound = self.compiled = self.device = self.dtype = None

    def __call__(self, tensor: torch.Tensor):
        compiled = self.compiled
        if compiled is None or tensor.dtype is not self.dtype or tensor.data_ptr() % 16:
            return self._launch(tensor)
        bound = list(self.bound)
        bound[self.slot] = tensor
        _run(compiled, self.grid, self.device, bound)
        return compiled

    def _launch(self, tensor):
        args = self.args[:self.slot] + (tensor,) + self.args[self.slot + 1:]
        compiled = launch(self.kernel, self.grid, *args, **self.meta)
        if self.compiled is None and FAST_PATH and not _INTERPRETING and tensor.data_ptr() % 16 == 0:
            names = _param_names(self.kernel, len(args), self.meta)
            if names is not None:  # bind: the positional arguments, then the constexprs in order; the
                # varying slot is left empty: holding this call's tensor would keep it alive (for NF4,
                # one dequantized weight per weight, for the life of the model)
                self.bound = self.args + tuple(self.meta[name] for name in names)
                self.compiled, self.device, self.dtype = compiled, torch.cuda.current_device(), tensor.dtype
        return compiled


def _hook(chain):
    """A launch hook, or None when there is none: recent Triton keeps an always-present, usually
    empty HookChain, and building the launch metadata for an empty chain is wasted host time."""
    if chain is None or getattr(chain, "calls", None) == []:
        return None
    return chain


def clear_cache():
    """Forget the compiled kernels held for the fast path (Triton's own cache is untouched)."""
    _compiled.clear()
    _plans.clear()
