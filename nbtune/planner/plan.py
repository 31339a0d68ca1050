"""``plan(...)``: will this fine-tune fit this GPU, how much memory goes where, and what to change.

    >>> p = plan("llama-3.1-8b", gpu="T4", seq_len=2048, batch_size=1)
    >>> p.fits, round(p.peak_gib, 1)
    >>> p.breakdown            # term -> GiB, in display order
    >>> p.suggest()            # largest batch / seq_len that fit, or the smallest change that fits
    >>> p.to_yaml(magic=True)  # the matching %%finetune cell

The memory model is :mod:`nbtune.planner.memory`; the GPU and model catalogs are
:mod:`~nbtune.planner.gpus` and :mod:`~nbtune.planner.shapes`. Pure Python: torch is imported
only to detect the GPU for ``gpu="auto"``.
"""
from __future__ import annotations

import copy
import dataclasses
import html
import os
import textwrap
import warnings
from typing import Any, Callable

from . import memory
from .gpus import CATALOG as GPU_CATALOG
from .gpus import GPU, planned_gpu, resolve_gpu
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
          "loss chunk": "#DA8BC3", "allocator overhead": "#8C8C8C", "CUDA context": "#CCB974"}


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
    holds that mode and ``checkpointing_reason`` says why (None for a mode asked for by name).
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
            mode, self.checkpointing_reason = auto_checkpointing(settings.world_size, lambda: Plan(
                shape, gpu, dataclasses.replace(settings, gradient_checkpointing="plain"), margin_gib=margin_gib,
                coefficients=self.coefficients))
            settings = dataclasses.replace(settings, gradient_checkpointing=mode)
        self.settings = settings
        self.base_config = copy.deepcopy(base_config) if base_config else None
        self.notes = list(notes or [])
        self._margin_arg = margin_gib
        self.estimate = memory.estimate(shape, settings, gpu.context_gib, self.coefficients)
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
    def fits(self) -> bool:
        return self.margin_gib >= self.required_margin_gib and self.settings.seq_len <= self.model.max_positions

    @property
    def world_size(self) -> int:
        return self.settings.world_size

    @property
    def checkpointing_auto(self) -> bool:
        """True when gradient checkpointing was asked for as "auto" (and resolved by the planner)."""
        return self.checkpointing_reason is not None

    def checkpointing_line(self) -> str | None:
        """'gradient checkpointing auto -> plain checkpointing: <why>', or None for a mode asked for by name."""
        if not self.checkpointing_auto:
            return None
        return f"gradient checkpointing auto -> {LABELS[self.settings.gradient_checkpointing]}: {self.checkpointing_reason}"

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
        unless ``gradient_checkpointing`` is among the changes; ``gradient_checkpointing="auto"`` asks for it."""
        gpu = resolve_gpu(changes.pop("gpu")) if "gpu" in changes else self.gpu
        grad_accum = changes.pop("grad_accum", self.grad_accum)
        auto = self.checkpointing_auto and "gradient_checkpointing" not in changes
        if changes.get("gradient_checkpointing") == "auto":
            auto = True
            changes["gradient_checkpointing"] = self.settings.gradient_checkpointing  # resolved by Plan()
        st = dataclasses.replace(self.settings, **changes)
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
        config this plan came from held): what ``nbtune.build_config`` and ``%%finetune`` take."""
        st = self.settings
        cfg: dict[str, Any] = copy.deepcopy(self.base_config) if self.base_config else {}
        model = dict(cfg.get("model") or {})
        model.update(name=self.model_ref, max_seq_length=st.seq_len, load_in_4bit=st.load_in_4bit,
                     dtype=self.dtype_requested if self.dtype_requested == "auto" else st.dtype)
        lora = dict(cfg.get("lora") or {})
        lora.update(r=st.lora_rank, alpha=self.lora_alpha if self.lora_alpha is not None else lora.get("alpha", st.lora_rank),
                    targets=st.lora_targets if isinstance(st.lora_targets, str) else list(st.lora_targets))
        train = dict(cfg.get("train") or {})
        # "auto" stays "auto": the run resolves it for the GPUs it gets (see auto_checkpointing)
        train.update(batch_size=st.batch_size,
                     gradient_checkpointing="auto" if self.checkpointing_auto else st.gradient_checkpointing,
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
                f"{targets} ({self.lora_params / 1e6:.1f}M params), {LABELS[st.gradient_checkpointing]}, "
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
        return term

    def verdict(self) -> str:
        if self.fits:
            return f"FITS ({self.margin_gib:.2f} GiB to spare)"
        if self.margin_gib >= 0 and self.settings.seq_len <= self.model.max_positions:
            return (f"TOO TIGHT (only {self.margin_gib:.2f} GiB to spare; "
                    f"the planner wants {self.required_margin_gib:.2f})")
        if self.settings.seq_len > self.model.max_positions:
            return "DOES NOT FIT (seq_len above the model's limit)"
        return f"DOES NOT FIT (short by {-self.margin_gib:.2f} GiB)"

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
                     f"  -> {self.verdict()}")
        tps = self.tokens_per_s
        if tps:
            lines.append(f"  speed (rough roofline): ~{_round_sig(tps)} tokens/s" + (" per GPU" if self.world_size > 1 else ""))
        lines.append(f"  coefficients: {self.coefficients.source}")
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
            f"</table>"
            + (f"<div style='color:#57606a'>speed (rough roofline): ~{_round_sig(tps)} tokens/s</div>" if tps else "")
            + f"<div style='color:#57606a'>coefficients: {html.escape(self.coefficients.source)}</div>{notes}</div>"
        )

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


def _describe_changes(plan: Plan, changes: dict) -> str:
    parts = []
    for k, v in changes.items():
        if k == "grad_accum":
            continue
        old = plan.gpu.name if k == "gpu" else getattr(plan.settings, k, None)
        fmt = lambda x: str(x).lower() if isinstance(x, bool) else str(x)  # noqa: E731
        parts.append(f"{k}: {fmt(old)} -> {fmt(v)}")
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
        return Suggestion({}, plan, mb, ms, (
            f"fits with {plan.margin_gib:.2f} GiB to spare on {plan.gpu.name}. Largest batch size at seq_len "
            f"{st.seq_len}: {mb}; longest seq_len at batch size {st.batch_size}: {ms}"))

    def attempt(changes: dict) -> Plan:
        return plan.replace(**changes)

    single: list[dict] = []
    if st.gradient_checkpointing != "offload":
        single.append({"gradient_checkpointing": "offload"})
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
        top = _largest(lambda k: plan.replace(seq_len=k * 256).fits, 1,
                       min(st.seq_len - 1, plan.model.max_positions) // 256)
        if top >= 1:
            single.append({"seq_len": top * 256})
    for changes in single:
        p = attempt(changes)
        if p.fits:
            return _found(plan, changes, p)

    # Several changes together: everything that costs nothing in results first, then the rest.
    combo: dict[str, Any] = {}
    for changes in ({"gradient_checkpointing": "offload"}, {"optimizer": "adamw_8bit"} if st.optimizer == "adamw" else {},
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

    # Nothing on this GPU: the smallest catalogued GPU on which the original set-up fits.
    for gpu in sorted(GPU_CATALOG.values(), key=lambda g: g.total_gib):
        if gpu.total_gib > plan.gpu.total_gib:
            p = plan.replace(gpu=gpu)
            if p.fits:
                return _found(plan, {"gpu": gpu.name}, p)
    return Suggestion({}, None, 0, 0, f"{plan.verdict()}; nothing within reach fits on {plan.gpu.name} or a larger "
                                      f"catalogued GPU: even 4-bit, offloaded, batch 1, seq_len 256 needs "
                                      f"{base.replace(seq_len=256).peak_gib:.2f} GiB")


def _found(plan: Plan, changes: dict, p: Plan) -> Suggestion:
    mb, ms = p.max_batch_size(), p.max_seq_len()
    return Suggestion(changes, p, mb, ms, (
        f"{plan.verdict()} at {plan.peak_gib:.2f} GiB of {plan.capacity_gib:.2f}. Smallest change that fits: "
        f"{_describe_changes(plan, changes)} -> {p.peak_gib:.2f} GiB, {p.margin_gib:.2f} GiB to spare"))


# ---------------------------------------------------------------------------- entry points
def plan(model, gpu="T4", seq_len: int = 2048, batch_size: int = 2, lora_rank: int = 16,
         lora_targets="all-linear", dtype: str = "auto", load_in_4bit: bool | None = True,
         gradient_checkpointing="auto", optimizer: str = "adamw_8bit", loss: str = "auto",
         embeddings_fp32: bool = False, margin_gib: float | None = None, grad_accum: int | None = None,
         lora_alpha: float | None = None, coefficients: Coefficients | None = None,
         base_config: dict | None = None, patch: bool | None = None, attention: str = "auto",
         world_size: int = 1) -> Plan:
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
    the plan reports the global batch.
    """
    shape = resolve_shape(model)
    g = resolve_gpu(gpu)
    notes = []
    requested = "auto" if dtype in (None, "auto") else _norm_choice(str(dtype), DTYPE_ALIASES, "dtype")
    resolved = ("bfloat16" if g.bf16 else "float16") if requested == "auto" else requested
    if resolved == "bfloat16" and not g.bf16:
        notes.append(f"{g.name} has no bf16: nbtune trains in fp16 there")
        resolved = "float16"
    four_bit = True if load_in_4bit is None else bool(load_in_4bit)
    if shape.prequantized and not four_bit:
        notes.append("the checkpoint is pre-quantized to 4-bit: it loads in 4-bit")
        four_bit = True
    if patch is None:
        patch = os.environ.get(memory.PATCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
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
    )
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
        grad_accum=t.get("grad_accum"), lora_alpha=lo.get("alpha"), base_config=cfg,
        world_size=world_size if world_size is not None else _launcher_world_size(),
    )
    from_cfg.update(overrides)
    return plan(**from_cfg)


def auto_checkpointing(world_size: int, plain_plan: Callable[[], Plan]) -> tuple[str, str]:
    """The rule behind gradient checkpointing "auto", the config's default: (mode, one-line reason).

    One process on one GPU: "offload", the least GPU memory (what lets a 7-8B model fit a free T4),
    at some speed on a large GPU (~10% on an H200). Data parallel (``world_size`` > 1): every rank
    moves every layer's saved hidden state through the same host, and offloading ranks slow each
    other down, so "plain" where plain checkpointing fits this GPU with the headroom
    :attr:`Plan.fits` asks for, else "offload". The measurements behind both: benchmarks/NOTES.md,
    "Offloaded checkpointing" and "Multi-GPU".
    ``plain_plan``: returns the plan of the set-up with plain checkpointing (called only when
    ``world_size`` > 1)."""
    if world_size <= 1:
        return "offload", "one GPU: offloading the saved hidden states to CPU memory needs the least GPU memory"
    plain = plain_plan()
    per_gpu = f"{plain.peak_gib:.2f} GiB of {plain.capacity_gib:.2f} per {plain.gpu.name}"
    if plain.fits:
        return "plain", (f"data parallel on {world_size} GPUs and plain checkpointing fits ({per_gpu}); "
                         "offloading on every rank at once would share the host's copy bandwidth")
    return "offload", (f"data parallel on {world_size} GPUs, but plain checkpointing does not fit "
                       f"({per_gpu}: {plain.verdict()})")


def choose_checkpointing(config, gpu="auto", world_size: int | None = None, **overrides) -> tuple[str, str]:
    """The gradient checkpointing mode a run of ``config`` (an nbtune Config or its dict) uses, and
    why: (mode, one-line reason). A mode the config names ("offload", "plain", "off") is kept;
    "auto" follows :func:`auto_checkpointing` on ``gpu`` (per GPU) with ``world_size`` processes
    (default: the launcher's ``WORLD_SIZE``, else 1). Keyword arguments override ``plan()``'s.
    Raises :class:`PlannerError` when data parallel "auto" needs a plan and the model's shape is unknown."""
    cfg = _config_dict(config)
    train = cfg.get("train") or {}
    requested = _norm_choice(train.get("gradient_checkpointing", "auto"), CHECKPOINTING_ALIASES,
                             "gradient_checkpointing")
    if requested != "auto":
        return requested, "train.gradient_checkpointing in the config"
    world = world_size if world_size is not None else _launcher_world_size()
    return auto_checkpointing(world, lambda: plan_from_config(
        cfg, gpu=gpu, world_size=world, **{**overrides, "gradient_checkpointing": "plain"}))


def checkpointing_for_run(config, gpu_available: bool, plan: Plan | None = None,
                          world_size: int | None = None) -> tuple[str, str]:
    """The gradient checkpointing a training run uses and why (one line): what the trainer asks.

    A mode the config names is used as it is. "auto": the pre-flight ``plan``'s resolution when
    that plan resolved it; with no GPU here (``gpu_available`` False and none planned through
    ``NBTUNE_GPU``) "offload", as before "auto" existed (on CPU tensors it is plain recomputation:
    nothing is offloaded); on a GPU :func:`choose_checkpointing` for this GPU and ``world_size``
    (offload on one GPU; under data parallelism plain where it fits, else offload); "offload",
    the least GPU memory, when the planner cannot size the model (e.g. an uncatalogued hub id offline)."""
    cfg = _config_dict(config)
    requested = _norm_choice((cfg.get("train") or {}).get("gradient_checkpointing", "auto"), CHECKPOINTING_ALIASES,
                             "gradient_checkpointing")
    if requested != "auto":
        return requested, "train.gradient_checkpointing in the config"
    if plan is not None and plan.checkpointing_auto:
        return plan.settings.gradient_checkpointing, plan.checkpointing_reason
    if not (gpu_available or planned_gpu()):
        return "offload", "no GPU: on the CPU offloaded checkpointing is plain recomputation"
    try:
        return choose_checkpointing(cfg, gpu="auto", world_size=world_size)
    except PlannerError as e:
        return "offload", f"the planner cannot size this run ({e}): offloaded checkpointing, the least GPU memory"


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
    plan's advice when the run is predicted not to fit. Returns None (with a warning) when the
    model's shape cannot be found (e.g. an uncatalogued hub id offline): training goes ahead."""
    try:
        p = plan_from_config(config, gpu=gpu)
    except PlannerError as e:
        warnings.warn(f"nbtune planner: no memory check for this run ({e})", RuntimeWarning, stacklevel=2)
        return None
    if p.fits:
        return p
    advice = p.suggest()
    raise DoesNotFitError(
        f"this run is predicted not to fit in GPU memory:\n{p!r}\n{advice.message}\n"
        f"(to run it anyway, pass {override_hint})", p)
