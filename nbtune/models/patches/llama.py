"""Llama 2 / 3.x, Mistral, Qwen2 / 2.5: the Llama block.

RMSNorm ``w * x_hat`` (x_hat rounded to the input dtype first), SwiGLU MLP, separate q/k/v/o
projections, rotate-half RoPE (Llama 3's rope scaling lives in the rotary module, which is kept).
Differences handled by the shared forwards as they come: Qwen2's q/k/v bias (passed to the LoRA
kernels as the base layer's bias), Mistral's sliding window (``config.sliding_window``, every
layer), Qwen2's per-layer sliding window (``layer_types``, ``max_window_layers``).
"""
from .family import Family, window_from_config, window_from_module

LLAMA = Family(name="llama", model_types=("llama",), prefix="Llama")
MISTRAL = Family(name="mistral", model_types=("mistral",), prefix="Mistral", window=window_from_config,
                 passes_window=True)
QWEN2 = Family(name="qwen2", model_types=("qwen2",), prefix="Qwen2", window=window_from_module, passes_window=True)

FAMILIES = (LLAMA, MISTRAL, QWEN2)
