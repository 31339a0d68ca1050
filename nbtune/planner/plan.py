"""``plan(...)``: will this fine-tune fit this GPU, how much memory goes where, and what to change.

    >>> p = plan("llama-3.1-8b", gpu="T4", seq_len=2048, batch_size=1)
    >>> p.fits, round(p.peak_gib, 1)
    >>> p.breakdown            # term -> GiB, in display order
    >>> p.host_breakdown       # host RAM: term -> GiB (p.host_fits: None where the host's RAM is unknown)
    >>> p.suggest()            # largest batch / seq_len that fit, or the smallest change that fits
    >>> p.to_yaml(magic=True)  # the matching %%finetune cell

A plan has two budgets: the GPU's memory (:mod:`nbtune.planner.memory`) and the host's RAM
(:mod:`nbtune.planner.host_memory`), and fits only where both do. The GPU and model catalogs are
:mod:`~nbtune.planner.gpus` (with the notebook platforms' profiles, e.g. ``colab-t4``, which carry
their RAM) and :mod:`~nbtune.planner.shapes`. Pure Python: torch is imported only to detect the GPU
for ``gpu="auto"``.
"""
from __future__ import annotations

import copy
import dataclasses
import html
import os
import textwrap
import warnings
from typing import Any, Callable

from .._env import PATCH_ENV, env_flag
from ..methods import PREFERENCE_METHODS, RL_METHODS
from . import host_memory, memory
from .gpus import CATALOG as GPU_CATALOG
from .gpus import GPU, PROFILES, planned_gpu, resolve_gpu
from .memory import GiB, Coefficients, Settings
from .shapes import ModelShape, PlannerError, find_in_catalog, gated_note, is_gated_hub_id, resolve_shape

DTYPE_ALIASES = {"fp16": "float16", "float16": "float16", "half": "float16", "torch.float16": "float16",
                 "bf16": "bfloat16", "bfloat16": "bfloat16", "torch.bfloat16": "bfloat16",
                 "fp32": "float32", "float32": "float32", "float": "float32", "torch.float32": "float32"}
OPTIMIZER_ALIASES = {"adamw_8bit": "adamw_8bit", "adamw8bit": "adamw_8bit", "adam8bit": "adamw_8bit",
                     "8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
                     "adamw": "adamw", "adamw_torch": "adamw", "fp32": "adamw", "adamw_fp32": "adamw",
                     "sgd": "sgd"}
CHECKPOINTING_ALIASES = {"auto": "auto", "offload": "offload", "offloaded": "offload", "nbtune": "offload",
                         "plain": "plain", True: "plain", "true": "plain", "on": "plain",
                         "off": "off", False: "off", "false": "off", "none": "off", None: "off"}
LABELS = {"offload": "offloaded checkpointing", "plain": "plain checkpointing", "off": "no checkpointing",
          "adamw_8bit": "AdamW 8-bit", "paged_adamw_8bit": "paged AdamW 8-bit", "adamw": "AdamW fp32", "sgd": "SGD",
          "fused": "fused loss", "unfused": "unfused loss", "float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
COLORS = {"base weights": "#4C72B0", "embedding + LM head": "#55A868", "LoRA parameters": "#C44E52",
          "LoRA gradients": "#DD8452", "optimizer states": "#8172B3", "activations": "#937860",
          "loss chunk": "#DA8BC3", "generation": "#E5AE38", "allocator overhead": "#8C8C8C",
          "CUDA context": "#CCB974"}
HOST_COLORS = {"process baseline": "#64B5CD", "dataset + tokenization": "#8EBA42",
               "model loading (transient)": "#BBBBBB", "offloaded activations": "#937860",
               "offload pool rounding": "#C4AD66", "paged optimizer": "#8172B3"}


class CheckpointingChoice(tuple):
    """The gradient checkpointing a set-up runs and why: a ``(mode, reason)`` pair (it unpacks and
    compares as one, as the planner's answer always has), with ``offload_layers``: for "offload", how
    many decoder layers (the first ones) keep their input in host memory, the rest checkpointed
    plainly on the GPU; None: all of them."""

    def __new__(cls, mode: str, reason: str, offload_layers: int | None = None):
        self = super().__new__(cls, (mode, reason))
        self.offload_layers = offload_layers if mode == "offload" else None
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.offload_layers)

    @property
    def mode(self) -> str:
        return self[0]

    @property
    def reason(self) -> str:
        return self[1]

    def __repr__(self) -> str:
        return f"CheckpointingChoice({self[0]!r}, {self[1]!r}, offload_layers={self.offload_layers!r})"


def _norm_choice(value, aliases: dict, what: str):
    key = value.lower().strip() if isinstance(value, str) else value
    if key in aliases:
        return aliases[key]
    raise PlannerError(f"{what} {value!r}: one of {', '.join(sorted({str(v) for v in aliases.values()}))}")


class Plan:
    """The planner's answer for one model, GPU and training set-up. GiB throughout.

    ``reserved_gib``: torch's reserved peak (what ``torch.cuda.max_memory_reserved()`` shows);
    ``peak_gib``: that plus the CUDA context (what the GPU holds); ``capacity_gib``: the GPU's
    total; ``margin_gib``: capacity - peak; ``fits``: the margin is at least ``required_margin_gib``.
    Every figure is per GPU: in a data-parallel run (``world_size`` > 1) each GPU holds all of
    it, and ``global_batch`` rows (batch x grad_accum x world_size) make one optimizer step.

    ``checkpointing_auto``: the set-up asked for gradient checkpointing "auto"; the plan is the
    plan of the mode it resolves to (:func:`auto_checkpointing`), ``settings.gradient_checkpointing``
    holds that mode (and ``settings.offload_layers`` how many layers it offloads where the host's RAM
    cannot hold them all) and ``checkpointing_reason`` says why (None for a mode asked for by name).

    Host RAM: ``host_breakdown`` (term -> GiB per process), ``host_peak_gib`` (all ``world_size``
    processes), ``host_capacity_gib`` (the host's RAM less what the OS and others hold; None where the
    GPU entry says nothing of its host), ``host_margin_gib``, ``host_fits`` (None: not judged).
    ``gpu_fits`` is the GPU's verdict alone; ``fits`` needs both.
    """

    def __init__(self, shape: ModelShape, gpu: GPU, settings: Settings, *, model_ref: str | None = None,
                 dtype_requested: str = "auto", grad_accum: int | None = None, lora_alpha: float | None = None,
                 margin_gib: float | None = None, coefficients: Coefficients | None = None,
                 base_config: dict | None = None, notes: list[str] | None = None, checkpointing_auto: bool = False):
        self.model = shape
        self.gpu = gpu
        self.model_ref = model_ref or shape.hub_id or shape.name
        self.dtype_requested = dtype_requested
        self.grad_accum = grad_accum
        self.lora_alpha = lora_alpha
        self.coefficients = coefficients or memory.coefficients()
        self.checkpointing_reason: str | None = None
        if checkpointing_auto:
            choice = auto_checkpointing(settings.world_size, lambda: Plan(
                shape, gpu, dataclasses.replace(settings, gradient_checkpointing="plain", offload_layers=None),
                margin_gib=margin_gib, coefficients=self.coefficients),
                offload_room=lambda: _offload_room(shape, gpu, settings, self.coefficients))
            self.checkpointing_reason = choice.reason
            settings = dataclasses.replace(settings, gradient_checkpointing=choice.mode,
                                           offload_layers=choice.offload_layers)
        self.settings = settings
        self.base_config = copy.deepcopy(base_config) if base_config else None
        self.notes = list(notes or [])
        self._margin_arg = margin_gib
        self.estimate = memory.estimate(shape, settings, gpu.context_gib, self.coefficients)
        self.host = host_memory.host_estimate(shape, settings, self.coefficients, gpu.host_process_gib)
        if settings.seq_len > shape.max_positions:
            self.notes.append(f"seq_len {settings.seq_len} is above {shape.name}'s limit of "
                              f"{shape.max_positions} positions")

    # ------------------------------------------------------------------ numbers
    @property
    def breakdown(self) -> dict[str, float]:
        """Term -> GiB, in display order; the terms add up to ``peak_gib``."""
        return {k: v / GiB for k, v in self.estimate.terms.items()}

    @property
    def reserved_gib(self) -> float:
        return self.estimate.reserved_bytes / GiB

    @property
    def peak_gib(self) -> float:
        return self.reserved_gib + self.gpu.context_gib

    @property
    def capacity_gib(self) -> float:
        return self.gpu.total_gib

    @property
    def usable_gib(self) -> float:
        return self.gpu.usable_gib

    @property
    def margin_gib(self) -> float:
        """GiB left free at the peak (negative: short by that much)."""
        return self.capacity_gib - self.peak_gib

    @property
    def required_margin_gib(self) -> float:
        if self._margin_arg is not None:
            return float(self._margin_arg)
        return max(memory.FIT_MARGIN_GIB, memory.FIT_MARGIN_FRACTION * self.reserved_gib)

    @property
    def gpu_fits(self) -> bool:
        """The GPU's verdict alone (and the model's position limit)."""
        return self.margin_gib >= self.required_margin_gib and self.settings.seq_len <= self.model.max_positions

    @property
    def fits(self) -> bool:
        """Both budgets fit: the GPU's, and the host's RAM where it is known."""
        return self.gpu_fits and self.host_fits is not False

    # ------------------------------------------------------------------ host RAM
    @property
    def host_breakdown(self) -> dict[str, float]:
        """Host RAM per training process, term -> GiB (HOST_TERMS order; the loading transient comes and
        goes before training, so the terms do not simply add up: see ``host_peak_gib``)."""
        return {k: v / GiB for k, v in self.host.terms.items()}

    @property
    def host_process_peak_gib(self) -> float:
        """One training process's host-RAM peak."""
        return self.host.peak_bytes / GiB

    @property
    def host_peak_gib(self) -> float:
        """The host-RAM peak of the run: every data-parallel process on this host holds its own."""
        return self.world_size * self.host_process_peak_gib

    @property
    def host_capacity_gib(self) -> float | None:
        """The host RAM the training may use (its RAM less what others hold); None: not known."""
        return self.gpu.host_budget_gib

    @property
    def host_margin_gib(self) -> float | None:
        """GiB of host RAM left at the peak (negative: short by that much); None: not known."""
        cap = self.host_capacity_gib
        return None if cap is None else cap - self.host_peak_gib

    @property
    def host_required_margin_gib(self) -> float | None:
        cap = self.host_capacity_gib
        return None if cap is None else host_memory.host_margin_gib(cap)

    @property
    def host_fits(self) -> bool | None:
        """The host RAM's verdict: None where the host's RAM is not known (a bare GPU entry)."""
        if self.host_capacity_gib is None:
            return None
        return self.host_margin_gib >= self.host_required_margin_gib

    @property
    def offloaded_layers(self) -> int:
        """Decoder layers whose checkpointed input lives in host memory."""
        return self.settings.offloaded_layers(self.model.num_layers)

    @property
    def world_size(self) -> int:
        return self.settings.world_size

    @property
    def checkpointing_auto(self) -> bool:
        """True when gradient checkpointing was asked for as "auto" (and resolved by the planner)."""
        return self.checkpointing_reason is not None

    def checkpointing_label(self) -> str:
        """'offloaded checkpointing', or for a partial offload 'offloaded checkpointing (20 of 32 layers;
        12 plain)'."""
        st = self.settings
        label = LABELS[st.gradient_checkpointing]
        n, total = self.offloaded_layers, self.model.num_layers
        if st.gradient_checkpointing == "offload" and n < total:
            label += f" ({n} of {total} layers; {total - n} plain)"
        return label

    def checkpointing_line(self) -> str | None:
        """'gradient checkpointing auto -> plain checkpointing: <why>', or None for a mode asked for by name."""
        if not self.checkpointing_auto:
            return None
        return f"gradient checkpointing auto -> {self.checkpointing_label()}: {self.checkpointing_reason}"

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all GPUs: batch_size x grad_accum x world_size."""
        return self.settings.batch_size * (self.grad_accum or 1) * self.settings.world_size

    def parallel_line(self) -> str | None:
        """'data parallel: 2 GPUs, global batch 16 rows (...); figures per GPU', or None on one GPU."""
        if self.world_size <= 1:
            return None
        return (f"data parallel: {self.world_size} GPUs, global batch {self.global_batch} rows (batch "
                f"{self.settings.batch_size} x grad_accum {self.grad_accum or 1} x {self.world_size} GPUs); "
                "every figure here is per GPU")

    @property
    def lora_params(self) -> int:
        return int(self.estimate.details["lora_params"])

    @property
    def tokens_per_s(self) -> float | None:
        """Rough roofline estimate (see memory.tokens_per_second); None when the GPU's rates are unknown."""
        return memory.tokens_per_second(self.model, self.settings, self.gpu.tflops_16bit, self.gpu.bandwidth_gbs,
                                        self.coefficients)

    # ------------------------------------------------------------------ variations
    def replace(self, **changes) -> "Plan":
        """The same plan with some settings changed: seq_len, batch_size, lora_rank, lora_targets,
        dtype, load_in_4bit, gradient_checkpointing, optimizer, loss, embeddings_fp32, gpu, grad_accum
        (and mlp_tail=False: the LoRA MLP's schedule before the checkpointed tail, for old measurements).
        A plan of gradient checkpointing "auto" stays "auto" (resolved again for the new set-up)
        unless ``gradient_checkpointing`` is among the changes; ``gradient_checkpointing="auto"`` asks for it.
        Also ``offload_layers``, ``data_rows``, ``data_tokens_per_row`` (the host-RAM estimate's inputs)
        and ``host_ram_gib`` (the host's RAM in GiB, for a GPU entry that has none)."""
        gpu = resolve_gpu(changes.pop("gpu")) if "gpu" in changes else self.gpu
        if "host_ram_gib" in changes:
            gpu = gpu.with_host(changes.pop("host_ram_gib"))
        grad_accum = changes.pop("grad_accum", self.grad_accum)
        auto = self.checkpointing_auto and "gradient_checkpointing" not in changes
        if changes.get("gradient_checkpointing") == "auto":
            auto = True
            changes["gradient_checkpointing"] = self.settings.gradient_checkpointing  # resolved by Plan()
        st = dataclasses.replace(self.settings, **changes)
        if st.generation_rows:  # GRPO: the completions a step samples follow the batch and the length
            st = dataclasses.replace(st, generation_rows=st.batch_size * (grad_accum or 1), generation_tokens=st.seq_len)
        return Plan(self.model, gpu, st, model_ref=self.model_ref, dtype_requested=(
            st.dtype if "dtype" in changes else self.dtype_requested), grad_accum=grad_accum,
            lora_alpha=self.lora_alpha, margin_gib=self._margin_arg, coefficients=self.coefficients,
            base_config=self.base_config, notes=[n for n in self.notes if "limit of" not in n],
            checkpointing_auto=auto)

    def max_batch_size(self, limit: int = 1024) -> int:
        """The largest batch size that fits at this seq_len (0 if none does)."""
        return _largest(lambda b: self.replace(batch_size=b).fits, 1, limit)

    def max_seq_len(self, step: int = 256, limit: int | None = None) -> int:
        """The longest seq_len (a multiple of ``step``, up to the model's limit) that fits at this batch size."""
        limit = min(limit or self.model.max_positions, self.model.max_positions)
        top = _largest(lambda k: self.replace(seq_len=k * step).fits, 1, max(1, limit // step))
        return top * step

    def suggest(self) -> "Suggestion":
        """If the plan fits: the largest batch size and seq_len that fit (one varied at a time).
        If not: the smallest change that makes it fit, tried in this order (the first that alone
        fits wins): offloaded checkpointing, 8-bit AdamW, 16-bit embeddings, a smaller batch
        (grad_accum raised to keep the tokens per optimizer step), 4-bit base weights, a smaller
        LoRA rank, a shorter seq_len; then all of them together; then a larger GPU."""
        return _suggest(self)

    # ------------------------------------------------------------------ config
    def to_config(self) -> dict:
        """The matching nbtune config (sections model / lora / train, plus whatever else the
        config this plan came from held): what ``nbtune.build_config`` and ``%%finetune`` take. A config
        has no layer count for offloading: a partial offload is written as gradient checkpointing
        "auto", which offloads as many layers as the run's host holds."""
        st = self.settings
        cfg: dict[str, Any] = copy.deepcopy(self.base_config) if self.base_config else {}
        model = dict(cfg.get("model") or {})
        model.update(name=self.model_ref, max_seq_length=st.seq_len, load_in_4bit=st.load_in_4bit,
                     dtype=self.dtype_requested if self.dtype_requested == "auto" else st.dtype)
        lora = dict(cfg.get("lora") or {})
        lora.update(r=st.lora_rank, alpha=self.lora_alpha if self.lora_alpha is not None else lora.get("alpha", st.lora_rank),
                    targets=st.lora_targets if isinstance(st.lora_targets, str) else list(st.lora_targets))
        train = dict(cfg.get("train") or {})
        # "auto" stays "auto": the run resolves it for the GPUs it gets (see auto_checkpointing); so does a
        # partial offload asked for by hand, which a config states as "auto" (offload what the host holds)
        partial = st.gradient_checkpointing == "offload" and self.offloaded_layers < self.model.num_layers
        train.update(batch_size=st.batch_size,
                     gradient_checkpointing="auto" if self.checkpointing_auto or partial else st.gradient_checkpointing,
                     optimizer=st.optimizer)
        if self.grad_accum is not None:
            train["grad_accum"] = self.grad_accum
        cfg.update(model=model, lora=lora, train=train)
        order = ["model", "data", "lora", "train", "output"]
        return {k: cfg[k] for k in order if k in cfg} | {k: v for k, v in cfg.items() if k not in order}

    def to_yaml(self, magic: bool = False) -> str:
        """The config as YAML text; ``magic=True`` puts ``%%finetune`` on the first line (a notebook cell)."""
        import yaml

        text = yaml.safe_dump(self.to_config(), sort_keys=False, default_flow_style=False)
        if is_gated_hub_id(self.model_ref):  # a comment under the name: the cell cannot run without it
            name_line = next(line for line in text.splitlines() if line.startswith("  name: "))
            comment = "\n".join("  # " + part for part in textwrap.wrap(gated_note(self.model_ref), 96))
            text = text.replace(name_line + "\n", f"{name_line}\n{comment}\n", 1)
        return ("%%finetune\n" + text) if magic else text

    # ------------------------------------------------------------------ display
    def settings_line(self) -> str:
        st = self.settings
        weights = "4-bit NF4" if st.load_in_4bit else "16-bit weights" if st.dtype != "float32" else "fp32 weights"
        targets = st.lora_targets if isinstance(st.lora_targets, str) else ",".join(st.lora_targets)
        layers = "nbtune kernels" if st.patched else "transformers modules"
        return (f"{st.batch_size} x {st.seq_len} tokens, {LABELS[st.dtype]}, {weights}, LoRA r={st.lora_rank} "
                f"{targets} ({self.lora_params / 1e6:.1f}M params), {self.checkpointing_label()}, "
                f"{LABELS[st.optimizer]}, {layers}, {LABELS[st.loss]}")

    def term_label(self, term: str) -> str:
        st = self.settings
        if term == "base weights":
            return "base weights (NF4 + quant constants)" if st.load_in_4bit else f"base weights ({LABELS[st.dtype]})"
        if term == "embedding + LM head":
            tied = " (tied)" if self.model.tie_embeddings else ""
            return f"embedding + LM head{tied} ({'fp32' if st.embeddings_fp32 else LABELS[st.dtype]})"
        if term == "optimizer states":
            return f"optimizer states ({LABELS[st.optimizer]})"
        if term == "loss chunk":
            return "loss chunk (beyond activations)" if st.loss == "fused" else "loss logits (beyond activations)"
        if term == "generation":
            if not st.generation_rows:
                return "generation (none)"
            return f"generation ({st.generation_rows} x <= {st.generation_tokens} tokens, KV cache; beyond training)"
        return term

    def host_term_label(self, term: str) -> str:
        st, d = self.settings, self.host.details
        if term == "process baseline":
            measured = self.gpu.host_process_gib
            now = f"; {measured:.2f} GiB now" if measured is not None else ""
            return f"process (Python, torch, CUDA{now})"
        if term == "dataset + tokenization":
            if st.data_rows is None:
                return "dataset + tokenization (size not given)"
            return f"dataset ({st.data_rows} rows x <= {d['data_tokens_per_row']} tokens)"
        if term == "model loading (transient)":
            return "model loading (before training)"
        if term == "offloaded activations":
            return f"offloaded layer inputs ({self.offloaded_layers} of {self.model.num_layers} layers)"
        if term == "paged optimizer":
            return "paged optimizer states"
        return term

    def gpu_verdict(self) -> str:
        """The GPU budget's verdict alone."""
        if self.gpu_fits:
            return f"FITS ({self.margin_gib:.2f} GiB to spare)"
        if self.margin_gib >= 0 and self.settings.seq_len <= self.model.max_positions:
            return (f"TOO TIGHT (only {self.margin_gib:.2f} GiB to spare; "
                    f"the planner wants {self.required_margin_gib:.2f})")
        if self.settings.seq_len > self.model.max_positions:
            return "DOES NOT FIT (seq_len above the model's limit)"
        return f"DOES NOT FIT (short by {-self.margin_gib:.2f} GiB)"

    def host_verdict(self) -> str:
        """The host RAM budget's verdict alone ("NOT CHECKED" where the host's RAM is unknown)."""
        fits = self.host_fits
        if fits is None:
            return "NOT CHECKED (host RAM unknown)"
        margin = self.host_margin_gib
        if fits:
            return f"FITS ({margin:.2f} GiB to spare)"
        if margin >= 0:
            return f"TOO TIGHT (only {margin:.2f} GiB to spare; the planner wants {self.host_required_margin_gib:.2f})"
        return f"DOES NOT FIT (short by {-margin:.2f} GiB)"

    def verdict(self) -> str:
        """Both budgets in one: the GPU's verdict while the GPU does not fit (with the host's when that
        fails too); else the host's when it does not fit ("... IN HOST RAM"); else the GPU's spare
        memory (and the host's, where known)."""
        host = self.host_fits
        if not self.gpu_fits:
            text = self.gpu_verdict()
            if host is False:
                margin = self.host_margin_gib
                text += (f"; host RAM short by {-margin:.2f} GiB too" if margin < 0
                         else f"; host RAM too tight too ({margin:.2f} GiB to spare)")
            return text
        if host is False:
            word, _, rest = self.host_verdict().partition(" (")
            return f"{word} IN HOST RAM ({rest}"
        text = self.gpu_verdict()
        if host:
            text = text[:-1] + f" on the GPU, {self.host_margin_gib:.2f} GiB of host RAM)"
        return text

    def host_unknown_hint(self) -> str:
        return (f"{self.gpu.name} says nothing of the machine's RAM: plan for a platform profile (e.g. "
                "gpu='colab-t4'), pass host_ram_gib= (--host-ram on the command line), or gpu='auto' on the machine")

    def host_lines(self, width: int = 40) -> list[str]:
        """The host-RAM section of the text breakdown."""
        per = " per process" if self.world_size > 1 else ""
        lines = [f"  host RAM{per}:"]
        for term, gib in self.host_breakdown.items():
            if term in ("offload pool rounding", "paged optimizer") and gib == 0:
                continue
            lines.append(f"  {self.host_term_label(term):<{width}}{gib:7.2f} GiB")
        times = f" ({self.world_size} processes)" if self.world_size > 1 else ""
        cap = self.host_capacity_gib
        if cap is None:
            lines.append(f"  {'peak in host RAM' + times:<{width}}{self.host_peak_gib:7.2f} GiB"
                         f"  -> {self.host_verdict()}")
            lines.append(f"  note: host RAM not checked: {self.host_unknown_hint()}")
        else:
            lines.append(f"  {'peak in host RAM' + times:<{width}}{self.host_peak_gib:7.2f} GiB of {cap:.2f} GiB "
                         f"({self.gpu.host_ram_gib:.2f} GiB RAM less {self.gpu.host_other_gib:.2f} held by others)"
                         f"  -> {self.host_verdict()}")
        return lines

    def __repr__(self) -> str:
        width = 40
        lines = [f"nbtune plan: {self.model.name} on {self.gpu.describe()}", f"  {self.settings_line()}"]
        if self.parallel_line():
            lines.append(f"  {self.parallel_line()}")
        if self.checkpointing_line():
            lines.append(f"  {self.checkpointing_line()}")
        for term, gib in self.breakdown.items():
            if term == "CUDA context":
                lines.append("  " + "-" * (width + 10))
                lines.append(f"  {'torch reserved (peak)':<{width}}{self.reserved_gib:7.2f} GiB")
            lines.append(f"  {self.term_label(term):<{width}}{gib:7.2f} GiB")
        lines.append(f"  {'peak on the GPU':<{width}}{self.peak_gib:7.2f} GiB of {self.capacity_gib:.2f} GiB"
                     f"  -> {self.gpu_verdict()}")
        lines += self.host_lines(width)
        lines.append(f"  verdict: {self.verdict()}")
        tps = self.tokens_per_s
        if tps:
            lines.append(f"  speed (rough roofline): ~{_round_sig(tps)} tokens/s" + (" per GPU" if self.world_size > 1 else ""))
        lines.append(f"  coefficients: {self.coefficients.source}; host: {self.coefficients.host_source}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        ok = self.fits
        color = "#1a7f37" if ok else "#cf222e"
        rows = "".join(
            f"<tr><td style='text-align:left;padding:1px 8px'>"
            f"<span style='display:inline-block;width:10px;height:10px;background:{COLORS[t]};margin-right:6px'></span>"
            f"{html.escape(self.term_label(t))}</td><td style='text-align:right;padding:1px 8px'>{g:.2f} GiB</td></tr>"
            for t, g in self.breakdown.items())
        tps = self.tokens_per_s
        notes = "".join(f"<div style='color:#9a6700'>note: {html.escape(n)}</div>" for n in self.notes)
        return (
            f"<div style='font-family:system-ui,sans-serif;font-size:13px'>"
            f"<div><b>{html.escape(self.model.name)}</b> on <b>{html.escape(self.gpu.name)}</b> "
            f"<span style='background:{color};color:white;border-radius:4px;padding:1px 6px;margin-left:6px'>"
            f"{html.escape(self.verdict())}</span></div>"
            f"<div style='color:#57606a'>{html.escape(self.settings_line())}</div>"
            + (f"<div style='color:#57606a'>{html.escape(self.parallel_line())}</div>" if self.parallel_line() else "")
            + (f"<div style='color:#57606a'>{html.escape(self.checkpointing_line())}</div>"
               if self.checkpointing_line() else "")
            + f"<table style='border-collapse:collapse;margin-top:4px'>{rows}"
            f"<tr style='border-top:1px solid #999'><td style='text-align:left;padding:1px 8px'><b>peak on the GPU</b></td>"
            f"<td style='text-align:right;padding:1px 8px'><b>{self.peak_gib:.2f} GiB</b> of {self.capacity_gib:.2f}</td></tr>"
            f"</table>{self._host_html()}"
            + (f"<div style='color:#57606a'>speed (rough roofline): ~{_round_sig(tps)} tokens/s</div>" if tps else "")
            + f"<div style='color:#57606a'>coefficients: {html.escape(self.coefficients.source)}</div>{notes}</div>"
        )

    def _host_html(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:left;padding:1px 8px'>"
            f"<span style='display:inline-block;width:10px;height:10px;background:{HOST_COLORS[t]};margin-right:6px'>"
            f"</span>{html.escape(self.host_term_label(t))}</td>"
            f"<td style='text-align:right;padding:1px 8px'>{g:.2f} GiB</td></tr>"
            for t, g in self.host_breakdown.items() if g or t not in ("offload pool rounding", "paged optimizer"))
        cap = self.host_capacity_gib
        of = f" of {cap:.2f}" if cap is not None else ""
        procs = f" ({self.world_size} processes)" if self.world_size > 1 else ""
        hint = (f"<div style='color:#9a6700'>host RAM not checked: {html.escape(self.host_unknown_hint())}</div>"
                if cap is None else "")
        return (f"<table style='border-collapse:collapse;margin-top:4px'>{rows}"
                f"<tr style='border-top:1px solid #999'><td style='text-align:left;padding:1px 8px'>"
                f"<b>peak in host RAM{procs}</b></td><td style='text-align:right;padding:1px 8px'>"
                f"<b>{self.host_peak_gib:.2f} GiB</b>{of} &rarr; {html.escape(self.host_verdict())}</td></tr>"
                f"</table>{hint}")

    def to_dict(self) -> dict:
        """Everything the plan says, JSON-ready."""
        return dict(
            model=self.model.name, model_ref=self.model_ref, gpu=self.gpu.name,
            settings=dataclasses.asdict(self.settings), breakdown_gib=self.breakdown, reserved_gib=self.reserved_gib,
            peak_gib=self.peak_gib, capacity_gib=self.capacity_gib, margin_gib=self.margin_gib, fits=self.fits,
            required_margin_gib=self.required_margin_gib, tokens_per_s=self.tokens_per_s,
            lora_params=self.lora_params, coefficients=self.coefficients.source, notes=self.notes,
            world_size=self.world_size, global_batch=self.global_batch,
            checkpointing_auto=self.checkpointing_auto, checkpointing_reason=self.checkpointing_reason,
            offloaded_layers=self.offloaded_layers, gpu_fits=self.gpu_fits, verdict=self.verdict(),
            host_breakdown_gib=self.host_breakdown, host_process_peak_gib=self.host_process_peak_gib,
            host_peak_gib=self.host_peak_gib, host_capacity_gib=self.host_capacity_gib,
            host_ram_gib=self.gpu.host_ram_gib, host_other_gib=self.gpu.host_other_gib,
            host_margin_gib=self.host_margin_gib, host_required_margin_gib=self.host_required_margin_gib,
            host_fits=self.host_fits, host_source=self.gpu.host_source or None,
            host_coefficients=self.coefficients.host_source,
        )


@dataclasses.dataclass
class Suggestion:
    """What ``Plan.suggest()`` proposes. ``changes`` is empty when the plan already fits."""

    changes: dict
    plan: Plan | None  # the plan with the changes applied (None: nothing in reach fits)
    max_batch_size: int  # at the (suggested) seq_len
    max_seq_len: int  # at the (suggested) batch size
    message: str

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits

    def to_config(self) -> dict:
        if self.plan is None:
            raise PlannerError(self.message)
        return self.plan.to_config()

    def to_yaml(self, magic: bool = False) -> str:
        if self.plan is None:
            raise PlannerError(self.message)
        return self.plan.to_yaml(magic=magic)

    def __repr__(self) -> str:
        return self.message


def _largest(ok, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ok(n) for a monotone (true..., false...) ok; lo - 1 if none."""
    if hi < lo or not ok(lo):
        return lo - 1
    good, n = lo, lo
    while n < hi:  # gallop up
        n = min(hi, n * 2)
        if ok(n):
            good = n
        else:
            break
    else:
        return good
    bad = n
    while bad - good > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good


def _round_sig(x: float) -> str:
    if x >= 1000:
        return f"{round(x, -2):,.0f}"
    if x >= 100:
        return f"{round(x, -1):.0f}"
    return f"{x:.0f}"


def _describe_changes(plan: Plan, changes: dict, new: Plan | None = None) -> str:
    parts = []
    for k, v in changes.items():
        if k == "grad_accum":
            continue
        old = plan.gpu.name if k == "gpu" else getattr(plan.settings, k, None)
        fmt = lambda x: str(x).lower() if isinstance(x, bool) else str(x)  # noqa: E731
        text = f"{k}: {fmt(old)} -> {fmt(v)}"
        if k == "gradient_checkpointing" and v == "auto" and new is not None:
            text += f" ({new.checkpointing_label()})"
        parts.append(text)
    if "grad_accum" in changes:
        parts.append(f"grad_accum: {plan.grad_accum or 1} -> {changes['grad_accum']} (same tokens per optimizer step)")
    return ", ".join(parts)


def _with_batch(plan: Plan, batch: int) -> dict:
    """Batch size ``batch`` or the largest divisor of batch x grad_accum below it, with grad_accum
    raised so that the tokens per optimizer step stay the same."""
    accum = plan.grad_accum or 1
    total = plan.settings.batch_size * accum
    if batch >= plan.settings.batch_size:
        return {"batch_size": batch}
    batch = max(d for d in range(1, batch + 1) if total % d == 0)
    return {"batch_size": batch, "grad_accum": total // batch}


def _suggest(plan: Plan) -> Suggestion:
    st = plan.settings
    if plan.fits:
        mb, ms = plan.max_batch_size(), plan.max_seq_len()
        host = f" and {plan.host_margin_gib:.2f} GiB of host RAM" if plan.host_fits else ""
        return Suggestion({}, plan, mb, ms, (
            f"fits with {plan.margin_gib:.2f} GiB to spare on {plan.gpu.name}{host}. Largest batch size at seq_len "
            f"{st.seq_len}: {mb}; longest seq_len at batch size {st.batch_size}: {ms}"
            + (" (both budgets: GPU and host RAM)" if plan.host_fits is not None else "")))

    def attempt(changes: dict) -> Plan:
        return plan.replace(**changes)

    # Offloading, the least GPU memory: where the host's RAM is known, as much of it as the host holds
    # ("auto"), else all of it.
    host_known = plan.host_fits is not None
    offload = {} if plan.checkpointing_auto else (
        {"gradient_checkpointing": "auto"} if host_known else {"gradient_checkpointing": "offload"})
    single: list[dict] = []
    if offload and (st.gradient_checkpointing != "offload" or plan.host_fits is False):
        single.append(offload)
    if st.optimizer in ("adamw",):
        single.append({"optimizer": "adamw_8bit"})
    if st.embeddings_fp32:
        single.append({"embeddings_fp32": False})
    if st.batch_size > 1:
        b = _largest(lambda n: plan.replace(batch_size=n).fits, 1, st.batch_size - 1)
        if b >= 1:
            single.append(_with_batch(plan, b))
    if not st.load_in_4bit:
        single.append({"load_in_4bit": True})
    for r in (64, 32, 16, 8, 4):
        if r < st.lora_rank and plan.replace(lora_rank=r).fits:
            single.append({"lora_rank": r})
            break
    if st.seq_len > 256:
        hi = min(st.seq_len - 1, plan.model.max_positions) // 256
        top = _largest(lambda k: plan.replace(seq_len=k * 256).fits, 1, hi)
        shorter = {"seq_len": top * 256} if top >= 1 else None
        if offload.get("gradient_checkpointing") == "auto":
            # offloading only what the host holds may keep a longer context than offloading it all
            top_auto = _largest(lambda k: plan.replace(**offload, seq_len=k * 256).fits, 1, hi)
            if top_auto > top:
                shorter = {**offload, "seq_len": top_auto * 256}
        if shorter:
            single.append(shorter)
    for changes in single:
        p = attempt(changes)
        if p.fits:
            return _found(plan, changes, p)

    # Several changes together: everything that costs nothing in results first, then the rest.
    combo: dict[str, Any] = {}
    for changes in (offload, {"optimizer": "adamw_8bit"} if st.optimizer == "adamw" else {},
                    {"embeddings_fp32": False} if st.embeddings_fp32 else {}, {"load_in_4bit": True},
                    _with_batch(plan, 1) if st.batch_size > 1 else {}):
        combo.update(changes)
        p = attempt(combo)
        if p.fits:
            return _found(plan, {k: v for k, v in combo.items() if getattr(st, k, None) != v}, p)
    base = attempt(combo)
    top = _largest(lambda k: base.replace(seq_len=k * 256).fits, 1, max(1, min(st.seq_len, plan.model.max_positions) // 256))
    if top >= 1:
        combo["seq_len"] = top * 256
        return _found(plan, {k: v for k, v in combo.items() if getattr(st, k, None) != v}, attempt(combo))

    # Nothing on this GPU: the smallest larger one on which the original set-up fits (a platform
    # profile's larger siblings, with their RAM, for a profile; else the catalogued GPUs that run
    # nbtune's kernels, sm_70 on).
    larger = PROFILES.values() if plan.gpu.card else [g for g in GPU_CATALOG.values() if g.compute_capability >= (7, 0)]
    for gpu in sorted(larger, key=lambda g: g.total_gib):
        if gpu.total_gib > plan.gpu.total_gib:
            p = plan.replace(gpu=gpu)
            if p.fits:
                return _found(plan, {"gpu": gpu.name}, p)
    smallest = base.replace(seq_len=256)
    return Suggestion({}, None, 0, 0, f"{plan.verdict()}; nothing within reach fits on {plan.gpu.name} or a larger "
                                      f"catalogued GPU: even 4-bit, offloaded, batch 1, seq_len 256 needs "
                                      f"{_figures(smallest)}")


def _figures(p: Plan) -> str:
    """'6.57 GiB' (the GPU's peak), with ', 4.10 GiB of host RAM' where the host's RAM is known."""
    text = f"{p.peak_gib:.2f} GiB"
    if p.host_fits is not None:
        text += f", {p.host_peak_gib:.2f} GiB of host RAM"
    return text


def _found(plan: Plan, changes: dict, p: Plan) -> Suggestion:
    mb, ms = p.max_batch_size(), p.max_seq_len()
    where = f"{plan.peak_gib:.2f} GiB of {plan.capacity_gib:.2f}"
    if plan.host_fits is not None:
        where += f" on the GPU, {plan.host_peak_gib:.2f} GiB of {plan.host_capacity_gib:.2f} in host RAM"
    spare = f"{p.margin_gib:.2f} GiB to spare"
    if p.host_fits is not None:
        spare += f" on the GPU and {p.host_margin_gib:.2f} GiB in host RAM"
    return Suggestion(changes, p, mb, ms, (
        f"{plan.verdict()} at {where}. Smallest change that fits: "
        f"{_describe_changes(plan, changes, p)} -> {_figures(p)}, {spare}"))


# ---------------------------------------------------------------------------- entry points
def plan(model, gpu="T4", seq_len: int = 2048, batch_size: int = 2, lora_rank: int = 16,
         lora_targets="all-linear", dtype: str = "auto", load_in_4bit: bool | None = True,
         gradient_checkpointing="auto", optimizer: str = "adamw_8bit", loss: str = "auto",
         embeddings_fp32: bool = False, margin_gib: float | None = None, grad_accum: int | None = None,
         lora_alpha: float | None = None, coefficients: Coefficients | None = None,
         base_config: dict | None = None, patch: bool | None = None, attention: str = "auto",
         world_size: int = 1, host_ram_gib=None, offload_layers: int | None = None,
         data_rows: int | None = None, data_tokens_per_row: int | None = None, method: str = "sft") -> Plan:
    """Plan a LoRA/QLoRA fine-tune's GPU memory.

    model: a catalog name ("llama-3.1-8b"; see ``nbtune.planner.catalog_names()``), a hub id
        (catalogued ids need no network), a local checkpoint directory or config.json, a config
        dict, or a ``ModelShape``.
    gpu: a catalog name ("T4", "L4", "A100 40GB", ...; ``gpu_names()``), a ``GPU``, or "auto"
        (the current one; ``NBTUNE_GPU`` overrides).
    dtype: "auto" (bf16 where the GPU has it, else fp16), "float16", "bfloat16", "float32".
    load_in_4bit: NF4 base weights (None = yes, as on a GPU); pre-quantized checkpoints are 4-bit.
    gradient_checkpointing: "auto" (what the config's default runs: see :func:`auto_checkpointing`;
    the plan reports the mode it chose and why), "offload" (nbtune), "plain", "off". optimizer: "adamw_8bit", "adamw",
    "paged_adamw_8bit", "sgd". loss: "auto" (what nbtune runs: fused for patched model types),
    "fused", "unfused". patch: nbtune's architecture patches (None: on unless NBTUNE_PATCH=0; they
    apply to the model types in memory.PATCHED_MODEL_TYPES). attention: "auto", "efficient", "flash"
    (the SDPA kernel: a T4 has only the memory-efficient one).
    embeddings_fp32: embedding and head upcast to fp32 (what peft's prepare_model_for_kbit_training does).
    margin_gib: headroom a plan needs to count as fitting (default: max(0.3 GiB, 3 % of the peak)).
    world_size: data-parallel GPUs (DDP): the figures stay per GPU (plus DDP's gradient buckets);
    the plan reports the global batch. Host RAM is for all ``world_size`` processes together.
    host_ram_gib: the host's RAM in GiB (a number: the machine's total) or "auto" (this machine's,
    measured), for a GPU entry that has none; a platform profile (``gpu="colab-t4"``) and
    ``gpu="auto"`` bring their own. Without it a bare GPU entry's plan does not judge host RAM.
    offload_layers: with offloaded checkpointing, offload only the first N decoder layers' inputs
    (the rest checkpointed on the GPU); None: all (or, for "auto", as many as the host holds).
    data_rows, data_tokens_per_row: the training data's size, for the host-RAM estimate.
    method: train.method; "dpo" / "orpo" run each row's two replies together (twice the sequences
        per micro-batch), "grpo" adds its sampling of batch_size x grad_accum completions with a KV cache
        (the ``generation`` term: what it needs beyond training's activations).
    """
    shape = resolve_shape(model)
    g = resolve_gpu(gpu)
    if isinstance(host_ram_gib, str):
        if host_ram_gib.strip().lower() != "auto":
            raise PlannerError(f"host_ram_gib {host_ram_gib!r}: a number of GiB, or 'auto' for this machine's RAM")
        from .host import detect_host

        found = detect_host()
        if found is None:
            raise PlannerError("host_ram_gib='auto': this machine's RAM cannot be read (no /proc/meminfo); "
                               "give the number of GiB instead")
        g = g.with_host(found)
    elif host_ram_gib is not None:
        g = g.with_host(float(host_ram_gib))
    notes = []
    requested = "auto" if dtype in (None, "auto") else _norm_choice(str(dtype), DTYPE_ALIASES, "dtype")
    resolved = ("bfloat16" if g.bf16 else "float16") if requested == "auto" else requested
    if g.gpu_count > 1 and int(world_size) == 1:
        notes.append(f"{g.name} has {g.gpu_count} GPUs: world_size={g.gpu_count} (--num-gpus {g.gpu_count}) plans a "
                     "data-parallel run on all of them (the host's RAM is shared by their processes)")
    if resolved == "bfloat16" and not g.bf16:
        notes.append(f"{g.name} has no bf16: nbtune trains in fp16 there")
        resolved = "float16"
    four_bit = True if load_in_4bit is None else bool(load_in_4bit)
    if shape.prequantized and not four_bit:
        notes.append("the checkpoint is pre-quantized to 4-bit: it loads in 4-bit")
        four_bit = True
    if patch is None:
        patch = env_flag(PATCH_ENV, default=True)
    patched = bool(patch) and shape.model_type in memory.PATCHED_MODEL_TYPES
    if patch and not patched:
        notes.append(f"model type {shape.model_type!r} has no nbtune patch: transformers' modules and loss")
    loss_path = ("fused" if patched else "unfused") if loss in (None, "auto") else loss
    if attention in (None, "auto"):
        # the patched path uses flash (native GQA) on sm80+ in 16-bit; a T4 runs the efficient kernel
        attention = "flash" if (patched and g.compute_capability >= (8, 0) and resolved != "float32") else "efficient"
    model_ref = str(model) if isinstance(model, (str, os.PathLike)) else None
    if model_ref is not None and os.path.isfile(os.path.expanduser(model_ref)):
        model_ref = shape.hub_id  # a config.json: the config names its checkpoint directory
    if model_ref is not None and find_in_catalog(model_ref) is shape and "/" not in model_ref:
        model_ref = shape.hub_id or shape.name  # a catalog name: the config names where the weights are
    if is_gated_hub_id(model_ref):
        notes.append(gated_note(model_ref))
    checkpointing = _norm_choice(gradient_checkpointing, CHECKPOINTING_ALIASES, "gradient_checkpointing")
    st = Settings(
        seq_len=int(seq_len), batch_size=int(batch_size), lora_rank=int(lora_rank), lora_targets=lora_targets,
        dtype=resolved, load_in_4bit=four_bit,
        gradient_checkpointing="offload" if checkpointing == "auto" else checkpointing,  # "auto": resolved by Plan
        optimizer=_norm_choice(optimizer, OPTIMIZER_ALIASES, "optimizer"), loss=loss_path,
        embeddings_fp32=bool(embeddings_fp32), patched=patched, attention=attention, world_size=int(world_size),
        offload_layers=offload_layers, data_rows=data_rows, data_tokens_per_row=data_tokens_per_row,
        sequences_per_row=2 if method in PREFERENCE_METHODS else 1,
        generation_rows=int(batch_size) * int(grad_accum or 1) if method in RL_METHODS else 0,
        generation_tokens=int(seq_len) if method in RL_METHODS else 0,
    )
    if method in PREFERENCE_METHODS:
        notes.append(f"train.method {method}: each pair's chosen and rejected replies run through the model together: "
                     f"planned as {2 * st.batch_size} sequences of up to {st.seq_len} tokens per micro-batch")
    elif method in RL_METHODS:
        notes.append(f"train.method {method}: each step first samples its {st.generation_rows} completions together "
                     f"(prompt + completion up to {st.seq_len} tokens, a KV cache, no gradients), then trains on "
                     f"them {st.batch_size} at a time: the peak is the larger of the two")
    shape.lora_targets(lora_targets)  # raises on targets that match nothing
    allocator = memory.allocator_note(coefficients or memory.coefficients())
    if allocator:
        notes.append(allocator)
    return Plan(shape, g, st, model_ref=model_ref, dtype_requested=requested, grad_accum=grad_accum,
                lora_alpha=lora_alpha, margin_gib=margin_gib, coefficients=coefficients, base_config=base_config,
                notes=notes, checkpointing_auto=checkpointing == "auto")


def _config_dict(config) -> dict:
    if hasattr(config, "model_dump"):
        return config.model_dump()
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise PlannerError(f"plan_from_config takes an nbtune Config or a config dict, not {type(config).__name__}")


def plan_from_config(config, gpu="auto", world_size: int | None = None, **overrides) -> Plan:
    """The plan for an nbtune ``Config`` (or its dict form): model.name / max_seq_length / dtype /
    load_in_4bit, lora.r / targets, train.batch_size / grad_accum / gradient_checkpointing /
    optimizer. ``world_size``: data-parallel GPUs (default: the launcher's ``WORLD_SIZE``, else 1).
    Keyword arguments override ``plan()``'s arguments. Gradient checkpointing "auto" (the config's
    default) is planned as the mode :func:`choose_checkpointing` picks for this GPU and world size."""
    cfg = _config_dict(config)
    m, lo, t = cfg.get("model") or {}, cfg.get("lora") or {}, cfg.get("train") or {}
    if isinstance(m, str):
        m = {"name": m}
    from_cfg = dict(
        model=m.get("name") or "smollm2-135m-instruct", gpu=gpu, seq_len=m.get("max_seq_length", 2048),
        batch_size=t.get("batch_size", 2), lora_rank=lo.get("r", 16), lora_targets=lo.get("targets", "all-linear"),
        dtype=m.get("dtype", "auto"), load_in_4bit=m.get("load_in_4bit"),
        gradient_checkpointing=t.get("gradient_checkpointing", "auto"), optimizer=t.get("optimizer", "adamw_8bit"),
        grad_accum=t.get("grad_accum"), lora_alpha=lo.get("alpha"), base_config=cfg, method=t.get("method") or "sft",
        world_size=world_size if world_size is not None else _launcher_world_size(),
    )
    from_cfg.update(overrides)
    return plan(**from_cfg)


@dataclasses.dataclass(frozen=True)
class OffloadRoom:
    """How many decoder layers' inputs the host's RAM can hold beside the rest of the run:
    ``layers`` (0..``total``; -1 when the host cannot hold the run even with none offloaded), and the
    figures behind it, for the reason line."""

    layers: int
    total: int
    per_layer_gib: float
    budget_gib: float
    peak_all_gib: float  # the host peak with every layer offloaded

    def describe(self) -> str:
        return (f"all {self.total} would take {self.total * self.per_layer_gib:.2f} GiB, {self.per_layer_gib:.3f} GiB "
                f"each: a host peak of {self.peak_all_gib:.2f} GiB against {self.budget_gib:.2f}")


def _offload_room(shape: ModelShape, gpu: GPU, settings: Settings, c: Coefficients) -> OffloadRoom | None:
    """The host's room for offloaded layer inputs under ``settings`` (None where its RAM is unknown)."""
    budget = gpu.host_budget_gib
    if budget is None:
        return None
    st = dataclasses.replace(settings, gradient_checkpointing="offload", offload_layers=None)
    n = host_memory.max_offload_layers(shape, st, c, budget, settings.world_size, gpu.host_process_gib)
    full = host_memory.host_estimate(shape, st, c, gpu.host_process_gib)
    per_layer = full.details["bytes_per_offloaded_layer"] / GiB
    return OffloadRoom(n, shape.num_layers, per_layer, budget, settings.world_size * full.peak_bytes / GiB)


def auto_checkpointing(world_size: int, plain_plan: Callable[[], Plan],
                       offload_room: Callable[[], OffloadRoom | None] | None = None) -> CheckpointingChoice:
    """The rule behind gradient checkpointing "auto", the config's default: (mode, one-line reason),
    a :class:`CheckpointingChoice` whose ``offload_layers`` says how many layers to offload.

    One process on one GPU: "offload", the least GPU memory (what lets a 7-8B model fit a free T4),
    at some speed on a large GPU (~10% on an H200). Data parallel (``world_size`` > 1): every rank
    moves every layer's saved hidden state through the same host, and offloading ranks slow each
    other down, so "plain" where plain checkpointing fits this GPU with the headroom
    :attr:`Plan.fits` asks for, else "offload". The measurements behind both: benchmarks/NOTES.md,
    "Offloaded checkpointing" and "Multi-GPU".

    Host RAM: offloading keeps every offloaded layer's input in host memory (tokens x hidden x 2 bytes
    a layer: 12 GiB for llama3-8b at 49,152 tokens, more than free Colab's RAM once the process is
    counted). Where the host's RAM is known (``offload_room`` answers), "offload" offloads only as
    many layers (the first ones) as the host holds with its headroom and checkpoints the rest plainly
    on the GPU; none fit: "plain". Where it is unknown, all layers are offloaded, as before.

    ``plain_plan``: returns the plan of the set-up with plain checkpointing (called only when
    ``world_size`` > 1). ``offload_room``: returns the host's :class:`OffloadRoom`, or None."""
    reason = None
    if world_size > 1:
        plain = plain_plan()
        per_gpu = f"{plain.peak_gib:.2f} GiB of {plain.capacity_gib:.2f} per {plain.gpu.name}"
        if plain.fits:
            return CheckpointingChoice("plain", (
                f"data parallel on {world_size} GPUs and plain checkpointing fits ({per_gpu}); "
                "offloading on every rank at once would share the host's copy bandwidth"))
        reason = (f"data parallel on {world_size} GPUs, but plain checkpointing does not fit "
                  f"({per_gpu}: {plain.verdict()})")
    else:
        reason = "one GPU: offloading the saved hidden states to CPU memory needs the least GPU memory"
    room = offload_room() if offload_room is not None else None
    if room is None or room.layers >= room.total:
        if room is not None:
            reason += f"; host RAM holds all {room.total} layer inputs ({room.total * room.per_layer_gib:.2f} GiB)"
        return CheckpointingChoice("offload", reason)
    if room.layers > 0:
        return CheckpointingChoice("offload", (
            f"{reason}, but host RAM holds only {room.layers} of {room.total} layer inputs ({room.describe()}): "
            f"the first {room.layers} offloaded, the other {room.total - room.layers} checkpointed on the GPU"),
            offload_layers=room.layers)
    if room.layers == 0:
        return CheckpointingChoice("plain", (
            f"{reason}, but host RAM holds none of the {room.total} layer inputs beside the rest of the run "
            f"({room.describe()}): plain checkpointing on the GPU"))
    return CheckpointingChoice("plain", (
        f"{reason}, but host RAM cannot hold the run even with nothing offloaded ({room.describe()}): "
        "plain checkpointing on the GPU, the least host RAM"))


def choose_checkpointing(config, gpu="auto", world_size: int | None = None, **overrides) -> CheckpointingChoice:
    """The gradient checkpointing mode a run of ``config`` (an nbtune Config or its dict) uses, and
    why: (mode, one-line reason), with ``offload_layers`` (see :class:`CheckpointingChoice`). A mode the
    config names ("offload", "plain", "off") is kept; "auto" follows :func:`auto_checkpointing` on ``gpu``
    (per GPU, with its host's RAM) with ``world_size`` processes (default: the launcher's
    ``WORLD_SIZE``, else 1). Keyword arguments override ``plan()``'s. Raises :class:`PlannerError` when
    the model's shape is unknown."""
    cfg = _config_dict(config)
    train = cfg.get("train") or {}
    requested = _norm_choice(train.get("gradient_checkpointing", "auto"), CHECKPOINTING_ALIASES,
                             "gradient_checkpointing")
    if requested != "auto":
        return CheckpointingChoice(requested, "train.gradient_checkpointing in the config")
    world = world_size if world_size is not None else _launcher_world_size()
    if world <= 1:
        # one GPU: offload, as far as the host's RAM allows; the plan resolves it (and needs the shape
        # only where the host's RAM is known)
        try:
            p = plan_from_config(cfg, gpu=gpu, world_size=world, **{**overrides, "gradient_checkpointing": "auto"})
        except PlannerError:
            return auto_checkpointing(world, lambda: None)
        return CheckpointingChoice(p.settings.gradient_checkpointing, p.checkpointing_reason,
                                   p.settings.offload_layers)
    p = plan_from_config(cfg, gpu=gpu, world_size=world, **{**overrides, "gradient_checkpointing": "auto"})
    return CheckpointingChoice(p.settings.gradient_checkpointing, p.checkpointing_reason, p.settings.offload_layers)


def checkpointing_for_run(config, gpu_available: bool, plan: Plan | None = None,
                          world_size: int | None = None) -> CheckpointingChoice:
    """The gradient checkpointing a training run uses and why (one line): what the trainer asks; a
    :class:`CheckpointingChoice` (a (mode, reason) pair with ``offload_layers``).

    A mode the config names is used as it is. "auto": the pre-flight ``plan``'s resolution when
    that plan resolved it; with no GPU here (``gpu_available`` False and none planned through
    ``NBTUNE_GPU``) "offload", as before "auto" existed (on CPU tensors it is plain recomputation:
    nothing is offloaded); on a GPU :func:`choose_checkpointing` for this GPU, its host's RAM and
    ``world_size`` (offload on one GPU, as many layers as the host's RAM holds; under data parallelism
    plain where it fits, else offload); "offload", the least GPU memory, when the planner cannot size
    the model (e.g. an uncatalogued hub id offline)."""
    cfg = _config_dict(config)
    requested = _norm_choice((cfg.get("train") or {}).get("gradient_checkpointing", "auto"), CHECKPOINTING_ALIASES,
                             "gradient_checkpointing")
    if requested != "auto":
        return CheckpointingChoice(requested, "train.gradient_checkpointing in the config")
    if plan is not None and plan.checkpointing_auto:
        return CheckpointingChoice(plan.settings.gradient_checkpointing, plan.checkpointing_reason,
                                   plan.settings.offload_layers)
    if not (gpu_available or planned_gpu()):
        return CheckpointingChoice("offload", "no GPU: on the CPU offloaded checkpointing is plain recomputation")
    try:
        return choose_checkpointing(cfg, gpu="auto", world_size=world_size)
    except PlannerError as e:
        return CheckpointingChoice(
            "offload", f"the planner cannot size this run ({e}): offloaded checkpointing, the least GPU memory")


def _launcher_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 outside a launcher)."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    try:
        return max(1, int(value)) if value else 1
    except ValueError:
        raise PlannerError(f"environment variable WORLD_SIZE={value!r} is not an integer") from None


class DoesNotFitError(PlannerError):
    """Raised by :func:`preflight` when a run is predicted not to fit; the message holds the plan
    and its advice."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


def preflight(config, gpu="auto", override_hint: str = "memory_check=False") -> Plan | None:
    """What the trainer asks before loading anything: the plan, or ``DoesNotFitError`` with the
    plan's advice when the run is predicted not to fit the GPU or, where it is known (``gpu="auto"``
    measures this machine), the host's RAM. Returns None (with a warning) when the
    model's shape cannot be found (e.g. an uncatalogued hub id offline): training goes ahead."""
    try:
        p = plan_from_config(config, gpu=gpu)
    except PlannerError as e:
        warnings.warn(f"nbtune planner: no memory check for this run ({e})", RuntimeWarning, stacklevel=2)
        return None
    if p.fits:
        return p
    advice = p.suggest()
    where = ("GPU memory" if p.host_fits is not False else
             "host RAM (the notebook's kernel would be killed)" if p.gpu_fits else "GPU memory or host RAM")
    raise DoesNotFitError(
        f"this run is predicted not to fit in {where}:\n{p!r}\n{advice.message}\n"
        f"(to run it anyway, pass {override_hint})", p)
