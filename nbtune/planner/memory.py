"""nbtune's training memory, term by term: the formulas, and every coefficient in one place.

What is modelled is the peak of ``torch.cuda.max_memory_reserved()`` over training steps (what
an out-of-memory error sees, less the CUDA context) for nbtune's recipe:

- base linear layers in 4-bit NF4 with double quantization (bitsandbytes' layout), or 16-bit;
- embedding and LM head in the compute dtype (bitsandbytes never quantizes them);
- LoRA A/B in fp32 (nbtune.add_lora keeps adapters in fp32), their fp32 gradients, and the
  optimizer's states (AdamW 8-bit by default);
- activation checkpointing: ``offload`` (nbtune: each layer's input hidden state lives in pinned
  CPU memory; ~``offload_resident_inputs`` of them are on the GPU at a time), ``plain`` (every
  layer's input stays on the GPU) or ``off`` (every layer keeps all it saves);
- the patched layers of ``nbtune.models.patches`` (``patched``): RMSNorm, fused LoRA QKV and
  LoRA MLP kernels, in-place RoPE, SDPA with no mask tensor; unpatched model types run
  transformers' modules, which save more (``unpatched_activation_factor``) and build a
  (B, 1, S, S) mask for padded batches;
- the fused LoRA MLP in one of two schedules (``nbtune/kernels/lora.py``). As the *checkpointed tail*
  of its decoder layer (``mlp_checkpointed_tail``: a patched model type whose MLP output only
  goes into the residual stream, ``MLP_TAIL_MODEL_TYPES``; checkpointing ``offload`` or ``plain``,
  both through nbtune's wrapper that exposes the checkpoint phase; LoRA on gate, up and down) it
  saves only its input x, rebuilds gate/up inside the backward one token chunk at a time
  (``mlp_chunk_rows``, as ``mlp_token_chunks`` cuts them) and dequantizes one base weight at a
  time. Otherwise (gemma2/gemma3 with their post-feedforward norm, phi3's fused gate_up_proj,
  checkpointing ``off``, unpatched types, LoRA not on all three) it saves x, gate and up for the
  whole micro-batch, with act(gate) and act(gate)*up recomputed, as before;
- attention: SDPA's memory-efficient kernel (``attention="efficient"``, all a T4 runs; it has no
  GQA, so k and v are repeated to the query heads before it) or flash (sm80+, GQA native);
  O(S) memory either way, never S x S scores;
- the loss: ``fused`` (``nbtune.kernels.cross_entropy``: a (rows x vocab) logits chunk of at
  most 256 MiB, never the full logits; what patched models run) or ``unfused`` (transformers'
  ``ForCausalLMLoss``: full logits, their fp32 copy, log-softmax and its gradient).

Notation: T = batch x seq tokens per micro-batch; h hidden size; q = heads x head_dim;
kv = kv_heads x head_dim (q when the efficient kernel repeats k/v); i the MLP's intermediate
size (top-k experts' for MoE); L layers; V vocabulary; b bytes per element of the compute dtype
(2 for fp16/bf16, 4 for fp32); s = b / 2 (activation coefficients are for a 16-bit compute
dtype); u = 1 for patched layers, unpatched_activation_factor otherwise; P_lin the decoder's
linear parameters; P_lora the LoRA parameters.

Terms (bytes); their sum is torch's reserved peak, and the CUDA context comes on top:

    base weights       4-bit: P_lin * NF4_BYTES_PER_PARAM + (#linear tensors) * NF4_TENSOR_BYTES
                       16-bit: P_lin * b;  plus norms/biases and any vision tower at b bytes
    embedding + head   V * h * (1 if tied else 2) * b            (4 bytes with embeddings_fp32)
    LoRA parameters    P_lora * LORA_PARAM_BYTES
    LoRA gradients     P_lora * LORA_GRAD_BYTES * (2 when world_size > 1: DDP all-reduces the gradients
                       through flat bucket buffers that hold a second copy)
    optimizer states   P_lora * {adamw_8bit: ADAM8_BYTES_PER_PARAM, adamw: ADAM32_BYTES_PER_PARAM, sgd: 0}
    activations        act_scale * (common + layer_extra) + mlp_chunk, where per token
                         saved(layer) = u*s*(saved_h*h + saved_q*q + saved_kv*kv + saved_i*i' + saved_heads*heads)
                                        + saved_lora * s * r * (#LoRA modules per layer that save x A^T)
                         work(layer)  = saved + u*s*(transient_h*h + transient_i*i')
                         outer        = s * outer_h * h          (embedding output, final norm, grad stream)
                       with, for the MLP's schedule,
                         checkpointed tail: i' = 0 (nothing (tokens x i) is saved or held for the whole
                                  micro-batch); the MLP's three LoRA modules save no x A^T;
                                  mlp_chunk = mlp_chunk_buffers * rows * i * b, rows = mlp_chunk_rows(T, i, b)
                                  (g, u, h of one chunk in the forward; g, u, dh in the backward): bounded
                                  by MLP_CHUNK_BYTES per buffer, independent of T beyond one chunk
                         otherwise: i' = i (gate and up saved, dh transient, for all T tokens); mlp_chunk = 0
                       and
                         offload: common = T*((L - N + min(N, offload_resident_inputs))*h*b + outer) + mask
                                  layer_extra = T*work + dequant
                                  (N = offload_layers, the layers whose inputs go to host memory: all L
                                  unless fewer are asked for, the rest keep theirs on the GPU as plain)
                         plain:   common = T*(L*h*b + outer) + mask,  layer_extra = T*work + dequant
                         off:     common = T*(L*saved*saved_scale + outer) + mask,
                                  layer_extra = T*(work - saved) + dequant
                       mask    = unpatched only: B * S^2 * mask_bytes * (#masks) when the batch is padded
                                 (B > 1) or a sliding window is shorter than S
                       dequant = copies * (largest linear) * b   (4-bit: the 16-bit copy of W that each
                                 matmul dequantizes; copies = dequant_copies, as the MLP without the tail holds
                                 gate's and up's at once, or dequant_copies_tail when every base weight is
                                 dequantized for one GEMM at a time)
    loss chunk         max(0, loss_scale * loss_buffers - layer_peak), layer_peak = act_scale * layer_extra
                       + mlp_chunk: the loss runs after the last layer's forward and before the first
                       layer's backward, so only what it needs beyond the layers' own peak adds to the peak;
                         fused:   rows * V * b + T * h * b + 4 * T
                                  (rows as nbtune/_chunking.py's loss_chunk_rows chooses them)
                         unfused: T * V * unfused_bytes_per_logit + T * h * b
    generation         GRPO only: the step's completions are sampled first, without gradients, as G =
                       generation_rows sequences of up to n = generation_tokens tokens with a KV cache;
                       what that needs beyond training's activations and loss adds to the peak:
                         max(0, kv + prefill + logits + dequant - activations - loss), where
                         kv      = G * n * L * 2 * kv_dim * b       (the cache, every layer's k and v)
                         prefill = G * n * (4*h + 3*i) * b          (one layer's forward over the prompts)
                         logits  = 2 * G * V * 4                    (the last position's fp32 logits and
                                                                     sampling probabilities)
                       (a formula, not yet fitted to measurements)
    allocator overhead overhead_fixed + overhead_fraction * (activations + loss)
                       + overhead_per_tensor * (#linear tensors)   (block rounding, fragmentation; they
                       depend on the allocator's setting: ``Coefficients.alloc_conf`` says which one a fit
                       measured, ``allocator_setting()`` which one training runs with, ``allocator_note``
                       says when the two differ)
    CUDA context       the GPU's context_gib (not part of torch's reserved memory)

Host RAM (the machine's, not the GPU's) has its own model: :mod:`nbtune.planner.host_memory`, whose
coefficients are the ``host_*`` fields of :class:`Coefficients`.

STATUS OF THE COEFFICIENTS: until ``python benchmarks/calibrate.py measure`` has run on a
GPU and ``... calibrate.py fit`` has written fitted values into ``calibration.json``, the values in
``Coefficients`` are first-principles estimates: the saved-tensor counts come from what each
patched forward and kernel keeps for backward (their docstrings) and, for the unpatched factor,
from counting transformers' Llama decoder layer with peft LoRA under bf16 autocast with
saved-tensor hooks on a CPU; the fixed terms come from the formats' definitions; the overheads
are round guesses. Against the peer figures in benchmarks/README.md the defaults predict, for llama3-8b
with 4-bit, offloaded checkpointing and fp16 on a T4: 6.57 GiB at 1x2048 (Unsloth measures 6.50
GiB, nbtune's target is at most 0.95x that) and ~0.17 MiB per further token of context once the
MLP runs in more than one token chunk (beyond ~4.7k tokens; Unsloth: ~0.25-0.28 MiB); before the
checkpointed-tail MLP they predicted 6.75 GiB and ~0.28 MiB. ``coefficients()`` returns the
fitted set when calibration.json holds one.

WHAT THE FITTED SCALES APPLY TO. ``act_scale`` scales the per-token terms and the dequantized
weight, as it did when it was fitted; the MLP's chunk buffers (``mlp_chunk``) are an exact count of
what the kernel allocates (three (rows x i) tensors) and are added unscaled: act_scale was fitted
to formulas without them. The calibration.json fit of 2026-11-30 was measured before the
checkpointed tail (its records carry no ``mlp_tail``; ``calibration.predict`` replays them with
``Settings.mlp_tail=False``, the old schedule), so its act_scale (0.67) was fitted to formulas in
which the MLP's (tokens x i) tensors were 8*i bytes per token and layer. Applied to the new
formula it is kept as it is: at the calibration's llama-3.1-8b offload points the measured
allocated peak grows by ~185 KB per token, of which the full-T g, u, dh the old code held are
~86 KB; the remaining ~99 KB is ~0.60 of the ~164 KB per token that the new formula counts, so
0.67 over-predicts long contexts by ~10 % of the per-token activations (~0.5 GiB at 48k tokens on
llama-3.1-8b) -- the safe side -- until ``calibrate.py measure`` + ``fit`` are re-run with the new
code (its records then carry ``mlp_tail``: True, and the fit needs no change).
"""
from __future__ import annotations

import dataclasses
import json
import os
from functools import lru_cache
from pathlib import Path

from .._chunking import loss_chunk_rows, mlp_chunk_rows
from .shapes import ModelShape, PlannerError

GiB = 2**30
MiB = 2**20

# ---------------------------------------------------------------------------- exact constants
# NF4 with double quantization (bitsandbytes): 4 bits per value, one uint8 absmax code per 64-value
# block, one fp32 absmax per 256 codes (blocksize2), per tensor a 256-entry fp32 code table + offset.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_TENSOR_BYTES = 256 * 4 + 16
# peft keeps adapters of fp16/bf16 models in fp32 (autocast_adapter_dtype=True); gradients match.
LORA_PARAM_BYTES = 4
LORA_GRAD_BYTES = 4
# bitsandbytes AdamW8bit: two uint8 states per parameter + an fp32 absmax per 256-value block each.
ADAM8_BYTES_PER_PARAM = 2 + 2 * 4 / 256
# torch AdamW: two fp32 states, plus the foreach implementation's per-step temporaries (~1 fp32 copy).
ADAM32_BYTES_PER_PARAM = 8 + 4
OPTIMIZER_BYTES = {"adamw_8bit": ADAM8_BYTES_PER_PARAM, "paged_adamw_8bit": ADAM8_BYTES_PER_PARAM,
                   "adamw": ADAM32_BYTES_PER_PARAM, "sgd": 0.0}
# Model types that nbtune.models.patches patches (kernels, no mask tensor, fused loss); a test
# checks this against patches.SUPPORTED_MODEL_TYPES. Others run transformers' modules and loss.
PATCHED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3")
# Of those, the ones whose fused LoRA MLP can run as its layer's checkpointed tail: the MLP's output
# is only added to the residual (no post-feedforward norm, as gemma2/gemma3 have) and gate/up are
# separate LoRA projections (phi3's fused gate_up_proj does not go through lora_mlp). A test checks
# this against the patch families (post_mlp_norm, fused_gate_up).
MLP_TAIL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# A plan "fits" when the predicted peak leaves at least this much of the GPU free: the larger of
# FIT_MARGIN_GIB and FIT_MARGIN_FRACTION of the reserved peak (the model's error band).
FIT_MARGIN_GIB = 0.3
FIT_MARGIN_FRACTION = 0.03

CHECKPOINTING = ("offload", "plain", "off")
LOSS_PATHS = ("fused", "unfused")
ATTENTION_KERNELS = ("efficient", "flash")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

# The breakdown's terms, in display order; the last is outside torch's reserved memory.
TERMS = ("base weights", "embedding + LM head", "LoRA parameters", "LoRA gradients", "optimizer states",
         "activations", "loss chunk", "generation", "allocator overhead", "CUDA context")


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Every number of the memory model that is not fixed by a format. Bytes per token per
    decoder layer at a 16-bit compute dtype unless said otherwise. See the module docstring for
    where the defaults come from and the formulas they enter."""

    # -- what one patched decoder layer saves for backward, bytes/token per unit --
    saved_h: float = 6.0  # normed attention input (lora_qkv's x), post-attention residual (RMSNorm's x),
    #                       normed MLP input (lora_mlp's x); the layer input itself is the checkpoint's
    saved_q: float = 6.0  # roped q, SDPA's output, o_proj's contiguous input
    saved_kv: float = 4.0  # roped k and v (repeated to the query heads for the efficient kernel)
    saved_i: float = 4.0  # gate and up (act(gate) and act(gate)*up are recomputed by the GLU kernel);
    #                       0 for an MLP that runs as the checkpointed tail (it saves only x)
    saved_heads: float = 4.0  # fp32 logsumexp per head
    saved_lora: float = 2.0  # s * x @ A^T per LoRA module (tokens x r, 16-bit)
    # -- backward temporaries of one layer on top of what it saved --
    transient_h: float = 6.0  # dY, dX accumulator and the residual's gradient
    transient_i: float = 4.0  # dh (the recomputed h is written over it; dgate/dup overwrite gate/up);
    #                           0 for the checkpointed tail, whose buffers are mlp_chunk_buffers per chunk
    # -- the checkpointed-tail MLP: (chunk rows x i) buffers alive at once, bytes = count * rows * i * b
    #    (forward: g, u, h; backward: g, u, dh, with dg/du/h written over them in place). An exact count,
    #    not scaled by act_scale --
    mlp_chunk_buffers: float = 3.0
    # -- transformers' own modules (unpatched model types) save more: fp32 RMSNorm inputs,
    #    act(gate) and act*up, per-projection inputs. Ratio of the two enumerations at llama3-8b's
    #    shape (HF: 12h + 6q + 4kv + 8i saved, 6h + 6i transient) --
    unpatched_activation_factor: float = 1.5
    # -- outside the layers, bytes/token per hidden unit: embedding output, final norm (fp32 in +
    #    16-bit out), the hidden-state gradient stream and the last layer's output --
    outer_h: float = 12.0
    # -- offloaded checkpointing: layer inputs resident on the GPU at the backward's peak
    #    (nbtune/kernels/offload.py's DEVICE_WINDOW = 2, plus the prefetched and the current one) --
    offload_resident_inputs: float = 3.0
    # -- unpatched only: the mask transformers builds for padded batches / sliding windows,
    #    bytes per (query, key) (a bool mask) --
    mask_bytes: float = 1.0
    # -- 4-bit: bitsandbytes dequantizes W to a 16-bit temporary for each matmul (forward and
    #    input-gradient); copies of the largest linear layer alive at once --
    dequant_copies: float = 2.0  # the MLP without the tail: gate's W is still alive while up's is made
    # -- with the checkpointed-tail MLP every base weight is dequantized for one GEMM at a time --
    dequant_copies_tail: float = 1.0
    # -- transformers' unfused loss: 16-bit logits, fp32 copy, fp32 log-softmax, fp32 gradients
    #    (bytes per logit at the loss's peak; the trainer drops the output logits before backward) --
    unfused_bytes_per_logit: float = 12.0
    # -- fitted scales (1.0 = the formulas as written) --
    act_scale: float = 1.0
    # what layers save for backward when nothing is recomputed (checkpointing "off": L copies)
    saved_scale: float = 1.0
    loss_scale: float = 1.0
    # -- caching allocator: cuBLAS workspaces, small-block segments, rounding, fragmentation --
    overhead_fixed_gib: float = 0.20
    overhead_fraction: float = 0.05
    overhead_per_tensor_mib: float = 0.25
    # -- speed roofline: fraction of the 16-bit tensor-core peak that the matmuls reach --
    mfu: float = 0.45
    # -- host RAM (nbtune.planner.host_memory), per training process --
    # the process itself: interpreter, torch + CUDA libraries and the CUDA context's host side,
    # transformers/peft/trl/bitsandbytes imported. calibration.json "host" holds the measured figure
    # (a run's resident memory at its first step, less its dataset, offload buffers and loading
    # transient); this is the estimate used where that is null: what a Colab T4 runtime's meter
    # shows for such a process before it trains
    host_baseline_gib: float = 3.0
    # the dataset in host memory, bytes per token: the rows as Python strings (~4 B/token twice), the
    # token ids and labels as Python int lists while tokenizing (~72 B/token) and as Arrow int64
    # columns (16 B/token); counted whole for the run (rough, on the safe side)
    host_bytes_per_data_token: float = 100.0
    # the dataset when its size is not given (a typical SFT set: ~10k rows of a few hundred tokens)
    host_dataset_default_gib: float = 0.5
    # loading: checkpoints are read one shard at a time (the hub's default shard: 5 GB)
    host_load_shard_gib: float = 4.66

    source: str = "first-principles estimate (not yet calibrated)"
    # where host_baseline_gib comes from (calibration.json's "host" section once measured)
    host_source: str = "process baseline: an estimate, to be calibrated"
    # the CUDA allocator setting the overhead terms were measured with: "default" (torch's own) or a
    # PYTORCH_ALLOC_CONF value; None when not measured (the first-principles guesses)
    alloc_conf: str | None = None

    def replace(self, **changes) -> "Coefficients":
        return dataclasses.replace(self, **changes)


DEFAULT_COEFFICIENTS = Coefficients()
# The coefficients calibration fits (the others stay as derived).
FITTED_FIELDS = ("act_scale", "saved_scale", "loss_scale", "overhead_fixed_gib", "overhead_fraction")

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


@lru_cache(maxsize=None)
def _fitted(path: str) -> Coefficients | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fit = data.get("fit") or {}
    values = fit.get("coefficients") or {}
    if not values:
        return None
    known = {f.name for f in dataclasses.fields(Coefficients) if f.type in ("float", float)}
    clean = {k: float(v) for k, v in values.items() if k in known}
    alloc = measured_alloc_conf(data)
    return _with_host(DEFAULT_COEFFICIENTS.replace(
        **clean, alloc_conf=alloc,
        source=f"fitted to {fit.get('n_records', '?')} measurements ({data.get('date', 'undated')}, "
               f"{data.get('gpu', 'GPU')}, {describe_alloc_conf(alloc)})"), data)


# calibration.json's "host" section: measured host-RAM constants, null until measured
HOST_CALIBRATION_FIELDS = {"process_baseline_gib": "host_baseline_gib"}


def _with_host(c: Coefficients, data: dict) -> Coefficients:
    """``c`` with the host constants calibration.json's "host" section has measured (a number, not
    null), and ``host_source`` saying so."""
    host = data.get("host") or {}
    measured = {ours: float(host[theirs]) for theirs, ours in HOST_CALIBRATION_FIELDS.items()
                if isinstance(host.get(theirs), (int, float))}
    if not measured:
        return c
    return c.replace(**measured, host_source=f"process baseline measured ({host.get('date', 'undated')}, "
                                             f"{host.get('platform', 'host')})")


@lru_cache(maxsize=None)
def _host_only(path: str) -> Coefficients | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    c = _with_host(DEFAULT_COEFFICIENTS, data)
    return None if c is DEFAULT_COEFFICIENTS else c


def coefficients(path: str | Path | None = None) -> Coefficients:
    """The fitted coefficients from calibration.json when it holds a fit, else the defaults (with
    its measured host constants either way)."""
    where = str(path or CALIBRATION_FILE)
    return _fitted(where) or _host_only(where) or DEFAULT_COEFFICIENTS


# ---------------------------------------------------------------------------- allocator setting
def _normal_alloc_conf(value: str | None) -> str:
    """A setting in a comparable form: "default" for none, else its options lower-cased and sorted."""
    if not value or value.strip().lower() == "default":
        return "default"
    return ",".join(sorted(part.strip().lower() for part in value.split(",") if part.strip()))


def describe_alloc_conf(value: str | None) -> str:
    if _normal_alloc_conf(value) == "default":
        return "torch's default allocator"
    return f"allocator {value}"


def measured_alloc_conf(data: dict) -> str:
    """The allocator setting a calibration file's records were measured with ("default" when the file
    recorded none: ``measure`` writes null when neither PYTORCH_ALLOC_CONF nor its older name was set)."""
    value = data.get("alloc_conf")
    return "default" if _normal_alloc_conf(value) == "default" else str(value)


def allocator_setting(environ=None) -> str:
    """The CUDA allocator setting a training run in this environment gets: the user's
    PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF (where ``import nbtune`` also puts its own), else what
    ``import nbtune`` applies (``nbtune._allocator``: expandable segments), or "default" where nbtune
    leaves torch's own (``NBTUNE_ALLOCATOR=default``, Windows, WSL)."""
    from .._allocator import effective_setting

    return effective_setting(os.environ if environ is None else environ)


def allocator_note(c: Coefficients, environ=None) -> str | None:
    """A note for a plan whose allocator-overhead coefficients were measured with another allocator
    setting than training here runs with; None when they agree or were never measured."""
    if c.alloc_conf is None:
        return None
    now = allocator_setting(environ)
    then_n, now_n = _normal_alloc_conf(c.alloc_conf), _normal_alloc_conf(now)
    if then_n == now_n:
        return None
    expandable = "expandable_segments:true"
    if expandable in now_n.split(",") and expandable not in then_n.split(","):
        direction = ", which leaves less reserved-but-unused memory: that term is likely too high"
    elif expandable in then_n.split(",") and expandable not in now_n.split(","):
        direction = ", which leaves more reserved-but-unused memory: that term is likely too low"
    else:
        direction = ""
    return (f"allocator overhead was calibrated with {describe_alloc_conf(c.alloc_conf)}; training here uses "
            f"{describe_alloc_conf(now)}{direction} until `python benchmarks/calibrate.py measure` and "
            "`fit` are re-run")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One training set-up, as the memory model sees it (already resolved: no 'auto')."""

    seq_len: int = 2048
    batch_size: int = 2
    lora_rank: int = 16
    lora_targets: object = "all-linear"
    dtype: str = "float16"
    load_in_4bit: bool = True
    gradient_checkpointing: str = "offload"
    optimizer: str = "adamw_8bit"
    loss: str = "fused"
    embeddings_fp32: bool = False
    patched: bool = True  # nbtune.models.patches applies to this model type
    attention: str = "efficient"  # SDPA kernel: "efficient" (T4; repeats k/v for GQA) or "flash"
    world_size: int = 1  # data-parallel processes (one GPU each); every figure is per GPU
    # the fused LoRA MLP may run as its layer's checkpointed tail where nbtune does that
    # (``mlp_checkpointed_tail``); False models the code before it (calibration records measured then)
    mlp_tail: bool = True
    # offloaded checkpointing: how many decoder layers (the first ones) keep their input in host
    # memory; the rest are checkpointed plainly on the GPU. None: all of them
    offload_layers: int | None = None
    # the training data, for the host-RAM estimate: rows and tokens per row (None: not known)
    data_rows: int | None = None
    data_tokens_per_row: int | None = None
    # sequences each batch row runs as: 2 for DPO / ORPO (a pair's chosen and rejected replies go
    # through the model together, each up to seq_len tokens), else 1
    sequences_per_row: int = 1
    # GRPO: the completions one step samples together (batch_size x grad_accum) and the tokens each
    # may reach (prompt + completion <= seq_len); 0 for methods that generate nothing
    generation_rows: int = 0
    generation_tokens: int = 0

    def __post_init__(self):
        if self.world_size < 1:
            raise PlannerError(f"world_size must be at least 1 (got {self.world_size})")
        if self.seq_len <= 0 or self.batch_size <= 0 or self.lora_rank <= 0:
            raise PlannerError(f"seq_len, batch_size and lora_rank must be positive (got {self.seq_len}, "
                               f"{self.batch_size}, {self.lora_rank})")
        if self.dtype not in DTYPE_BYTES:
            raise PlannerError(f"dtype {self.dtype!r}: one of {', '.join(DTYPE_BYTES)}")
        if self.gradient_checkpointing not in CHECKPOINTING:
            raise PlannerError(f"gradient_checkpointing {self.gradient_checkpointing!r}: one of {', '.join(CHECKPOINTING)}")
        if self.optimizer not in OPTIMIZER_BYTES:
            raise PlannerError(f"optimizer {self.optimizer!r}: one of {', '.join(OPTIMIZER_BYTES)}")
        if self.loss not in LOSS_PATHS:
            raise PlannerError(f"loss {self.loss!r}: one of {', '.join(LOSS_PATHS)}")
        if self.attention not in ATTENTION_KERNELS:
            raise PlannerError(f"attention {self.attention!r}: one of {', '.join(ATTENTION_KERNELS)}")
        if self.sequences_per_row not in (1, 2):
            raise PlannerError(f"sequences_per_row must be 1 or 2 (got {self.sequences_per_row!r})")
        for name in ("offload_layers", "data_rows", "data_tokens_per_row"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise PlannerError(f"{name} must be a whole number of at least 0, or None (got {value!r})")

    def offloaded_layers(self, num_layers: int) -> int:
        """Decoder layers whose checkpointed input lives in host memory (0 unless offloading)."""
        if self.gradient_checkpointing != "offload":
            return 0
        return num_layers if self.offload_layers is None else min(self.offload_layers, num_layers)

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch's forward."""
        return self.seq_len * self.batch_size * self.sequences_per_row


def mlp_checkpointed_tail(shape: ModelShape, st: Settings) -> bool:
    """Whether nbtune runs the LoRA MLP of ``shape`` as the checkpointed tail of its decoder layer
    (``lora_mlp(checkpointed_tail=True)``): a patched model type whose MLP output is only added to the
    residual (MLP_TAIL_MODEL_TYPES), checkpointing through nbtune's wrapper (offload or plain: the
    kernel needs the checkpoint phase), and LoRA on gate, up and down (else the MLP is not the fused
    ``lora_mlp`` but its projections one by one)."""
    if not (st.mlp_tail and st.patched and shape.model_type in MLP_TAIL_MODEL_TYPES):
        return False
    if st.gradient_checkpointing not in ("offload", "plain") or shape.num_experts or not shape.gated_mlp:
        return False
    return set(MLP_PROJECTIONS) <= {name for name, *_ in shape.lora_targets(st.lora_targets)}


@dataclasses.dataclass
class Estimate:
    """Bytes per term (TERMS order, the CUDA context last) and the intermediate sizes behind them."""

    terms: dict
    details: dict

    @property
    def reserved_bytes(self) -> float:
        return sum(v for k, v in self.terms.items() if k != "CUDA context")


def _mlp_width(shape: ModelShape) -> float:
    """Intermediate units that one token's activations span (top-k experts for MoE; non-gated
    MLPs hold about half of a gated one's tensors)."""
    experts = (shape.experts_per_token or 1) if shape.num_experts else 1
    width = shape.intermediate_size * experts
    return width if shape.gated_mlp else width / 2


def estimate(shape: ModelShape, st: Settings, context_gib: float = 0.0, c: Coefficients | None = None) -> Estimate:
    """Peak training memory of ``shape`` under ``st``, term by term (see the module docstring)."""
    c = c or coefficients()
    b = DTYPE_BYTES[st.dtype]
    s = b / 2
    T = st.tokens
    h, L, V = shape.hidden_size, shape.num_layers, shape.vocab_size
    i = _mlp_width(shape)
    targets = shape.lora_targets(st.lora_targets)
    lora_modules = sum(n for *_, n in targets)
    p_lora = shape.lora_params(st.lora_rank, st.lora_targets)

    # -- weights --
    if st.load_in_4bit:
        weights = shape.linear_params * NF4_BYTES_PER_PARAM + shape.linear_tensors * NF4_TENSOR_BYTES
    else:
        weights = shape.linear_params * b
    weights += (shape.other_params + shape.vision_params) * b
    embeddings = shape.embedding_params * (4 if st.embeddings_fp32 else b)

    # -- LoRA and optimizer --
    lora_params = p_lora * LORA_PARAM_BYTES
    lora_grads = p_lora * LORA_GRAD_BYTES * (2 if st.world_size > 1 else 1)  # + DDP's bucket copy
    optimizer = p_lora * OPTIMIZER_BYTES[st.optimizer]

    # -- activations --
    u = 1.0 if st.patched else c.unpatched_activation_factor
    kv_width = shape.q_dim if (st.attention == "efficient" or not st.patched) else shape.kv_dim
    tail = mlp_checkpointed_tail(shape, st)
    # the MLP's (tokens x i) terms per token, and the LoRA modules that save an r-wide x A^T
    i_tokens = 0.0 if tail else i
    saving_lora = lora_modules - (len(MLP_PROJECTIONS) if tail else 0)
    saved = (u * s * (c.saved_h * h + c.saved_q * shape.q_dim + c.saved_kv * kv_width + c.saved_i * i_tokens
                      + c.saved_heads * shape.num_heads) + c.saved_lora * s * st.lora_rank * saving_lora)
    work = saved + u * s * (c.transient_h * h + c.transient_i * i_tokens)
    mlp_rows = mlp_chunk_rows(T, shape.intermediate_size, b) if tail else 0
    mlp_chunk = c.mlp_chunk_buffers * mlp_rows * shape.intermediate_size * b
    outer = s * c.outer_h * h
    n_masks = 0
    if not st.patched:  # the patched path builds no mask tensor
        if st.batch_size * st.sequences_per_row > 1:
            n_masks = 1
        if shape.sliding_window and st.seq_len > shape.sliding_window:
            n_masks = 2  # transformers builds one for the global and one for the local layers
    mask = st.batch_size * st.sequences_per_row * st.seq_len**2 * c.mask_bytes * n_masks
    copies = c.dequant_copies_tail if tail else c.dequant_copies
    dequant = copies * shape.largest_linear * b if st.load_in_4bit else 0.0
    n_off = st.offloaded_layers(L)
    inputs_on_gpu = L - n_off + min(n_off, c.offload_resident_inputs)
    if st.gradient_checkpointing == "offload":
        common = T * (inputs_on_gpu * h * b + outer) + mask
        layer_extra = T * work + dequant
    elif st.gradient_checkpointing == "plain":
        common = T * (L * h * b + outer) + mask
        layer_extra = T * work + dequant
    else:
        common = T * (L * saved * c.saved_scale + outer) + mask
        layer_extra = T * (work - saved) + dequant
    activations = c.act_scale * (common + layer_extra) + mlp_chunk
    layer_peak = c.act_scale * layer_extra + mlp_chunk

    # -- loss --
    if st.loss == "fused":
        rows = loss_chunk_rows(T, V, b)
        loss_buffers = rows * V * b + T * h * b + 4 * T
    else:
        rows = T
        loss_buffers = T * V * c.unfused_bytes_per_logit + T * h * b
    loss = max(0.0, c.loss_scale * loss_buffers - layer_peak)

    # -- generation (GRPO) --
    generation = 0.0
    if st.generation_rows:
        gen_tokens = st.generation_rows * (st.generation_tokens or st.seq_len)
        sampling = (gen_tokens * L * 2 * shape.kv_dim * b + gen_tokens * (4 * h + 3 * i) * b
                    + 2 * st.generation_rows * V * 4 + dequant)
        generation = max(0.0, sampling - activations - loss)

    # -- allocator overhead --
    overhead = (c.overhead_fixed_gib * GiB + c.overhead_fraction * (activations + loss)
                + c.overhead_per_tensor_mib * MiB * shape.linear_tensors)

    terms = dict(zip(TERMS, (weights, embeddings, lora_params, lora_grads, optimizer, activations, loss, generation,
                             overhead, context_gib * GiB)))
    details = dict(
        lora_params=p_lora, lora_modules_per_layer=lora_modules, tokens=T, bytes_per_element=b,
        saved_per_token_layer=saved, work_per_token_layer=work, checkpoint_inputs_on_gpu=(
            inputs_on_gpu if st.gradient_checkpointing == "offload"
            else L if st.gradient_checkpointing == "plain" else 0), offloaded_layers=n_off,
        mask_bytes=mask, dequant_scratch_bytes=dequant, layer_peak_bytes=layer_peak,
        loss_buffer_bytes=c.loss_scale * loss_buffers, loss_chunk_rows=rows,
        mlp_checkpointed_tail=tail, mlp_chunk_rows=mlp_rows, mlp_chunk_bytes=mlp_chunk,
    )
    return Estimate(terms=terms, details=details)


def tokens_per_second(shape: ModelShape, st: Settings, tflops: float | None, bandwidth_gbs: float | None,
                      c: Coefficients | None = None) -> float | None:
    """A rough roofline: matmul FLOPs at ``mfu`` of the 16-bit peak, plus the 4-bit weights'
    dequantization traffic, per step. FLOPs per token: 2 * P_lin per pass over the weights
    (forward, recompute unless checkpointing is off, input gradient; frozen weights get no
    weight gradient), LoRA's 6 * P_lora, the head's forward and input gradient 4 * V * h, and
    causal attention 2 * S * q per layer and pass (backward counted as 2.5 passes)."""
    if not tflops:
        return None
    c = c or coefficients()
    T = st.tokens
    passes = 2 if st.gradient_checkpointing == "off" else 3
    attn_passes = passes - 1 + 2.5
    flops_tok = (2 * shape.linear_params * passes + 6 * shape.lora_params(st.lora_rank, st.lora_targets)
                 + 4 * shape.vocab_size * shape.hidden_size
                 + shape.num_layers * 2 * st.seq_len * shape.q_dim * attn_passes)
    seconds = flops_tok * T / (tflops * 1e12 * c.mfu)
    if bandwidth_gbs:
        b = DTYPE_BYTES[st.dtype]
        per_param = (NF4_BYTES_PER_PARAM + 2 * b) if st.load_in_4bit else b
        seconds += passes * shape.linear_params * per_param / (bandwidth_gbs * 1e9)
    return T / seconds
