"""Phi-3 (mini / medium): the Llama block with fused projections and partial RoPE.

``qkv_proj`` is one LoRA linear whose output is split [q | k | v]; ``gate_up_proj`` is one LoRA
linear split [gate | up] before SwiGLU (``up * silu(gate)``); RoPE may rotate only the first
``partial_rotary_factor * head_dim`` channels (the rotary module's cos/sin width says how many, and
the RoPE kernel passes the rest through). One sliding window for every layer
(``config.sliding_window``, e.g. 2047 on Phi-3-mini-4k). The residual dropouts stay in
transformers' decoder layer.
"""
from .family import Family, window_from_config

PHI3 = Family(name="phi3", model_types=("phi3",), prefix="Phi3", fused_qkv=True, fused_gate_up=True,
              window=window_from_config, passes_window=True)

FAMILIES = (PHI3,)
