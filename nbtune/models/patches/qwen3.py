"""Qwen3: the Qwen2 block plus RMSNorms on q and k over each head (``q_norm``/``k_norm``, before
RoPE), no q/k/v bias by default, optional per-layer sliding window."""
from .family import Family, window_from_module

QWEN3 = Family(name="qwen3", model_types=("qwen3",), prefix="Qwen3", qk_norm=True, window=window_from_module,
               passes_window=True)

FAMILIES = (QWEN3,)
