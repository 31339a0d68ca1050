"""Gemma (1): RMSNorm ``(1 + w) * x_hat`` computed in fp32 and rounded once, GeGLU with the tanh
GELU (``hidden_act = gelu_pytorch_tanh``), embeddings scaled by sqrt(hidden) (done by transformers'
``GemmaTextScaledWordEmbedding`` module, which the patched model forward calls as it is; transformers
before 5.4 has no such module and scales in its model forward, and so does the patched one there)."""
from .family import Family

GEMMA = Family(name="gemma", model_types=("gemma",), prefix="Gemma", norm_offset=1.0, embed_scale=True)

FAMILIES = (GEMMA,)
