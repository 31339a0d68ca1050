"""Benchmark cases for nbtune.kernels, one module per kernel, run by ``benchmarks/kernel_bench.py``.

Each module defines ``cases(dtype) -> list[Case]`` at llama3-8b sizes (2x2048 tokens, hidden 4096,
intermediate 14336, vocab 128256). A case holds a function that makes fresh CUDA inputs and the
implementations to time on them: ``nbtune`` (the kernel) and ``eager`` (plain torch, usually the
reference); the runner adds ``compile`` (torch.compile of ``eager``) itself.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

CASE_MODULES = ("nf4", "nf4_matmul", "rms_norm", "rope", "glu", "lora", "cross_entropy", "varlen_attention")


@dataclasses.dataclass
class Case:
    kernel: str
    name: str
    make_inputs: Callable[[], tuple]
    impls: dict
    # Fewest bytes the operation must move through device memory (each input read once, each
    # output written once); None when the case is compute-bound and bandwidth means nothing.
    bytes_moved: int | None = None
    flops: int | None = None
    memory_bound: bool = True
    compile_eager: bool = True
