"""Host (Python) time of one patched training step, measured on the CPU with the GPU work taken out.

    python benchmarks/host_time_cpu.py [--checkpointing plain|offload] [--layers 8] [--repeats 7] [--profile]

Where a micro-batch is bound by the host (small micro-batches: llama 1x2048 rows of
benchmarks/RESULTS.md), every microsecond of Python per layer is a microsecond of step time. This
measures that Python without a GPU:
- a tiny random Llama (hidden 64, 8 layers) is patched by nbtune and given LoRA r=8 on all seven
  projections, with nbtune's checkpointing;
- every Triton launch is replaced by a no-op (NBTUNE_KERNELS=triton, so the Triton code paths and
  their launch bookkeeping run);
- torch runs on one thread, so its CPU compute of the tiny tensors stays small and steady.

It prints the best of ``--repeats`` runs of 20 steps (forward + backward), per step and per layer,
and with ``--profile`` the top functions by own time (cProfile) over 5 steps. Absolute figures are
this CPU's; compare two revisions or settings on one machine (the GPU host's own Python is faster).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def stub_triton_launches() -> None:
    """Every kernel launch through nbtune's launcher becomes a no-op (the modules bound the name at import)."""
    import importlib

    from nbtune.kernels import _launch

    def no_launch(kernel, grid, *args, **meta):
        return None

    _launch.launch = no_launch
    for name in ("glu", "rms_norm", "rope", "cross_entropy", "nf4", "lora"):
        module = importlib.import_module(f"nbtune.kernels.{name}")
        if hasattr(module, "launch"):
            module.launch = no_launch


def build_model(layers: int, checkpointing: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import nbtune
    from nbtune.models.patches import patch_model

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    patch_model(model)
    model = nbtune.add_lora(model, r=8, alpha=8, dropout=0.0, gradient_checkpointing=checkpointing,
                            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model.train()
    return model


def measure(layers: int = 8, checkpointing: str = "plain", repeats: int = 7, steps: int = 20,
            profile: bool = False) -> dict:
    os.environ["NBTUNE_KERNELS"] = "triton"
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    torch.set_num_threads(1)
    stub_triton_launches()
    model = build_model(layers, checkpointing)
    ids = torch.randint(0, 256, (1, 32))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    result = dict(checkpointing=checkpointing, layers=layers, repeats=repeats, steps=steps,
                  step_ms=round(best * 1e3, 3), layer_ms=round(best * 1e3 / layers, 4))
    if profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            step()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        result["profile"] = text.getvalue()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpointing", default="plain", choices=("plain", "offload"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    r = measure(a.layers, a.checkpointing, a.repeats, a.steps, a.profile)
    print(f"host time ({r['checkpointing']} checkpointing, {r['layers']} layers, best of {r['repeats']} x "
          f"{r['steps']} steps): {r['step_ms']:.2f} ms per step, {r['layer_ms']:.3f} ms per layer")
    if "profile" in r:
        print(r["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
