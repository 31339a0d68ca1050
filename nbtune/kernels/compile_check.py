"""Compile every nbtune Triton kernel for T4 (sm_75), A100 (sm_80) and H100/H200 (sm_90), no GPU needed.

Each kernel module exposes ``compile_specs()`` -> a list of :class:`CompileSpec`. This module
compiles each of them with ``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` and prints
a table. A spec that carries its launch options (``num_warps``, ``num_stages``, as the host
launches it) and needs more shared memory than one block may use on the target
(``SHARED_MEMORY_LIMIT``; sm_80 is held to the 99 KiB of its sm_86/sm_89 siblings: A10, L4)
fails as a compile error would: on that GPU it would not launch. Run it as ``python -m nbtune.kernels.compile_check`` (exit code 1 on any failure).
It must run *without* ``TRITON_INTERPRET=1``: the interpreter's ``@triton.jit`` objects cannot be
compiled.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
import time
import traceback

KERNEL_MODULES = (
    "nf4",
    "nf4_matmul",
    "rms_norm",
    "rope",
    "glu",
    "lora",
    "cross_entropy",
    "linear_logprobs",
    "offload",
    "varlen_attention",
)

TARGETS = (75, 80, 90)
# Bytes of shared memory one block may use (the opt-in maximum): T4 64 KiB, A10/L4/RTX 30-40 99 KiB
# (A100 has 163 KiB, but the sm_80 binaries serve the whole sm_8x family), H100/H200 227 KiB.
SHARED_MEMORY_LIMIT = {75: 65536, 80: 101376, 90: 232448}


@dataclasses.dataclass
class CompileSpec:
    """One compilation of one ``@triton.jit`` function.

    signature: argument name -> Triton type string ("*fp16", "i32", "fp32", "constexpr", ...).
    constexprs: values of the ``tl.constexpr`` arguments.
    targets: compute capabilities this spec must compile for (bf16 specs skip sm_75: T4 has no bf16).
    options: compile options as the host launches with them (``num_warps``, ``num_stages``).
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict
    targets: tuple = TARGETS
    options: dict = dataclasses.field(default_factory=dict)


def source(spec: CompileSpec):
    """The ``triton.compiler.ASTSource`` of one spec. Triton >= 3.3 takes the whole signature and
    ``constexprs=``; before (3.2, torch 2.6's) the signature lists only the runtime arguments and
    the constexpr values go in ``constants=``."""
    import inspect

    import triton

    if "constexprs" in inspect.signature(triton.compiler.ASTSource).parameters:
        return triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    signature = {name: kind for name, kind in spec.signature.items() if kind != "constexpr"}
    return triton.compiler.ASTSource(fn=spec.fn, signature=signature, constants=dict(spec.constexprs))


def compile_one(spec: CompileSpec, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget

    src = source(spec)
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(spec.options) or None)
    shared = kernel.metadata.shared
    # only where the spec carries the host's launch options: Triton's default stages are not what runs
    if spec.options and shared > SHARED_MEMORY_LIMIT[cc]:
        raise RuntimeError(f"needs {shared} B of shared memory, sm_{cc} allows {SHARED_MEMORY_LIMIT[cc]} B per block")
    return kernel


def all_specs(modules=KERNEL_MODULES):
    specs = []
    for name in modules:
        mod = importlib.import_module(f"nbtune.kernels.{name}")
        specs.extend(mod.compile_specs())
    return specs


def main(argv=None) -> int:
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    modules = tuple(argv) if argv else KERNEL_MODULES
    failures = 0
    rows = []
    for spec in all_specs(modules):
        for cc in TARGETS:
            if cc not in spec.targets:
                continue
            t = time.perf_counter()
            try:
                k = compile_one(spec, cc)
                rows.append((spec.name, cc, "ok", f"{len(k.asm['cubin'])} B cubin, {k.metadata.shared} B shared",
                              time.perf_counter() - t))
            except Exception as e:  # report every failure, not only the first
                failures += 1
                rows.append((spec.name, cc, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:80]}", 0.0))
                traceback.print_exc(file=sys.stderr)
    for name, cc, status, info, secs in rows:
        print(f"{name:40s} sm_{cc}  {status:4s}  {info}  ({secs:.1f}s)")
    print(f"{len(rows) - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
