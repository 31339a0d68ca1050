"""``finetune(config)``: config -> memory check -> model + LoRA -> tokenized data -> TRL SFTTrainer
-> metrics stream -> adapter on disk.

The magic, the CLI and the Python API all end here, so a run is the same whichever door it came
through. The output directory receives ``run.yaml`` (the resolved config), ``metrics.jsonl``
(the metrics stream), ``adapter/`` (peft format, safetensors, with the tokenizer),
``checkpoints/checkpoint-<step>/`` (resumable: adapter, optimizer, scheduler, RNG; see
:mod:`nbtune.train.checkpoint`) and, with ``output.export: [adapter, merged]``, ``merged/`` (a 16-bit
checkpoint with the adapter folded in).

Modes (the same flags on every door): ``plan=True`` returns the memory plan only, nothing loaded;
``dry_run=True`` checks everything a run needs (config, plan, tokenizer, data: rows, tokens, steps)
without loading the model or training; ``resume=True`` continues from the latest complete
checkpoint in ``output.dir``. Before a real run on a GPU the planner is asked whether the run fits;
when it predicts it does not, the run stops with the plan's advice (``train.force: true`` or
``force=True`` runs it anyway). Gradient checkpointing "auto" (the default) is resolved then too
(:func:`checkpointing_mode`: offload on one GPU, as many layers as the host's RAM holds, plain under
data parallelism where it fits), and the run says which mode it took and why (stderr, the ``start``
record, the result's summary). The pre-flight check covers the host's RAM too (measured here): a run
whose offloaded layers, dataset and process would not fit it stops before loading, with advice.

With ``data.packing`` the train rows are packed into micro-batches of ``batch_size x
max_seq_length`` tokens (:mod:`nbtune.train.packing`): the trainer then takes one packed entry per
micro-batch (TRL's per-device batch of 1) through a padding-free collator, and the summary says
how full they are. Rows cut to ``max_seq_length`` are counted (``rows_truncated``) either way.
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .. import quiet
from ..kernels.offload import reserve_tokens
from ..models import add_lora, load_model
from ..versions import stack_line
from . import batch_fit, disk, distributed, run_folder, session
from .checkpoint import (MARKER, AutoSave, InterruptCallback, checkpoint_problem, checkpoint_step, checkpoints_dir,
                         latest_checkpoint, remove_stale_staging, resumable_checkpoint, save_after_keyboard_interrupt,
                         sigint_stops)
from .config import PREFERENCE_METHODS, Config, ConfigError, build_config, output_dir
from .data import TokenizedData, apply_chat_template_choice, prepare_data
from .environment import check_bitsandbytes, cpu_note
from .gc_pause import CollectorPauses
from .metrics import MetricsStream, mean_train_loss, truncate_log
from .oom import released_on_oom
from .outcome import RunOutcome
from .packing import pack_dataset, packed_collator, packing_strategy
from .progress import TerminalProgress
from .stability import NonFiniteGuard, collapse_problem, collapsed_error, stop_diverged
from .trainer import sft_args, sft_trainer_class

if TYPE_CHECKING:
    from ..planner.plan import CheckpointingChoice


@dataclasses.dataclass
class FinetuneResult(RunOutcome):
    """What a run leaves: paths, losses, the metrics stream, and the trained model (``model`` is
    the live ``PeftModel``; ``chat()``/``generate()`` use it, or the saved adapter once the base
    has been reused by a later run)."""

    metrics: list
    model: object = dataclasses.field(repr=False, default=None)
    tokenizer: object = dataclasses.field(repr=False, default=None)
    interrupted: bool = False
    checkpoint: Path | None = None
    resumed_from: int | None = None
    merged_dir: Path | None = None
    plan: object = dataclasses.field(repr=False, default=None)
    world_size: int = 1
    global_batch: int | None = None
    replicas_identical: bool | None = None
    gradient_checkpointing: str | None = None  # the mode the run used ("auto" resolved)
    checkpointing_reason: str | None = None  # why (one line)
    rows_truncated: int = 0  # train rows longer than max_seq_length, cut to their first max_seq_length tokens
    packing: dict | None = None  # data.packing: documents, micro_batches, tokens, fill (PackingStats.as_dict)
    _generation: int = dataclasses.field(repr=False, default=0)

    # ---------------------------------------------------------------- after training
    def live_model(self):
        """(model, tokenizer) with this run's adapter: the live model while its base has not been
        reused by a later run, else the saved adapter loaded onto the current base."""
        if self.model is not None and self._generation in (0, session.generation()):
            return self.model, self.tokenizer
        from ..models import load_adapter

        base, tokenizer, _ = session.get_base_model(self.config, lambda: _load_base(self.config))
        model = load_adapter(base, self.adapter_dir)
        session.attach(model)
        self.model, self.tokenizer, self._generation = model, tokenizer, session.generation()
        return model, tokenizer

    def generate(self, prompt, max_new_tokens: int = 128, **kwargs) -> str:
        """One reply from the trained model to ``prompt`` (text or chat messages)."""
        from .generate import generate

        model, tokenizer = self.live_model()
        kwargs.setdefault("system_prompt", self.config.data.system_prompt)
        return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, **kwargs)

    def chat(self, system_prompt: str | None = None, **generate_kwargs):
        """A :class:`~nbtune.train.generate.Chat` with the trained model: ``c = result.chat(); c("hi")``."""
        from .generate import Chat

        model, tokenizer = self.live_model()
        return Chat(model, tokenizer, system_prompt=system_prompt or self.config.data.system_prompt,
                    **generate_kwargs)

    def save_adapter(self, path) -> Path:
        """Copy of the adapter (peft format) at ``path``."""
        from .generate import save_adapter

        model, tokenizer = self.live_model()
        return save_adapter(model, tokenizer, path)

    def save_merged(self, path=None, dtype: str | None = None) -> Path:
        """A merged 16-bit checkpoint (default ``<output.dir>/merged``); see :func:`~nbtune.train.generate.save_merged`."""
        from .generate import save_merged

        if not path:
            from .run_folder import record_written

            path = self.output_dir / "merged"
            record_written(self.output_dir, "merged")
        path = Path(path)
        self.merged_dir = save_merged(self.adapter_dir, path, base=self.config.model.name,
                                      dtype=dtype or self.config.output.merged_dtype,
                                      trust_remote_code=self.config.model.trust_remote_code)
        return self.merged_dir

    def export(self, format: str = "gguf", quant: str | None = None, out=None, dtype: str | None = None) -> Path:
        """This run as ``format``: adapter, merged or gguf (default ``<output.dir>/<format>``); see
        :func:`nbtune.export.api.export_run` (``quant`` for gguf, ``dtype`` for merged)."""
        from ..export.api import export_run

        if not out and format != "adapter":
            run_folder.record_written(self.output_dir, format)
        path = export_run(self.output_dir, format, quant=quant, out=out, dtype=dtype)
        if format == "merged":
            self.merged_dir = path
        return path


@dataclasses.dataclass
class DryRunReport:
    """What a run would do, without loading the model or training."""

    config: Config
    plan: object
    format: str
    train_rows: int
    eval_rows: int
    dropped: dict
    train_tokens: int
    trainable_tokens: int
    longest: int
    steps: int
    epochs: float
    resume_from: Path | None
    sample: str
    world_size: int = 1
    rows_truncated: int = 0
    packing: object = None  # PackingStats with data.packing
    notes: list = dataclasses.field(default_factory=list)  # one line each: what nbtune chose for the run
    unit: str = "rows"  # what the data holds: rows (sft) or pairs (dpo / orpo)

    def summary(self) -> str:
        lines = [
            f"dry run: {self.config.model.name} on {self.config.data.source} ({self.format} format)",
            f"  train {self.unit}: {self.train_rows}" + (f" ({sum(self.dropped.values())} dropped: "
                                                   + ", ".join(f"{n} {why}" for why, n in self.dropped.items()) + ")"
                                                   if self.dropped else ""),
            f"  eval {self.unit}: {self.eval_rows}",
            f"  tokens: {self.train_tokens:,} ({self.trainable_tokens:,} trained on), longest row {self.longest} "
            f"of max_seq_length {self.config.model.max_seq_length}"
            + (f" ({self.rows_truncated} longer rows truncated to it)" if self.rows_truncated else ""),
            *([f"  {self.packing.line()}"] if self.packing is not None else []),
            f"  steps: {self.steps} x {distributed.batch_description(self.config, self.world_size).replace('rows', self.unit, 1)} = "
            f"{self.epochs:.2f} epochs" + (" (global batch; memory per GPU)" if self.world_size > 1 else ""),
            f"  output: {self.config.output.dir}"
            + (f" (would resume from {self.resume_from.name})" if self.resume_from else ""),
        ]
        if self.plan is not None:
            lines.append(f"  memory: {self.plan.peak_gib:.2f} GiB of {self.plan.capacity_gib:.2f} GiB on "
                         f"{self.plan.gpu.name} -> {self.plan.verdict()}")
            if self.plan.checkpointing_line():
                lines.append(f"  {self.plan.checkpointing_line()}")
        lines.append("  stack: " + stack_line())
        lines += [f"  note: {note}" for note in self.notes]
        lines.append("  first example: " + self.sample[:300].replace("\n", "\\n"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        return "<pre style='font-size:12px'>" + html.escape(self.summary()) + "</pre>"


# ---------------------------------------------------------------------------- pieces
def memory_plan(cfg: Config, gpu=None, world_size: int | None = None):
    """The planner's plan for this config: on this GPU, or (no GPU here) on ``gpu`` (default T4).
    Its figures are per GPU; ``world_size`` (default: the launcher's WORLD_SIZE) sets the global
    batch it reports. None, with a warning, when the planner is not available."""
    try:
        from ..planner import plan_from_config
    except ImportError as e:  # pragma: no cover - the planner ships with nbtune
        warnings.warn(f"nbtune: the memory planner is not available ({e}); no plan", RuntimeWarning, stacklevel=2)
        return None
    if gpu is None:
        gpu = "auto" if torch.cuda.is_available() else "T4"
    plan = plan_from_config(cfg, gpu=gpu, world_size=world_size or distributed.world_size())
    if gpu == "T4" and not torch.cuda.is_available():
        plan.notes.append("no GPU here: planned for a T4 (pass gpu= / --gpu to plan for another)")
    return plan


def check_fits(cfg: Config, force: bool = False):
    """Before loading anything on a GPU: the plan, or the planner's ``DoesNotFitError`` (with its
    advice) when the run is predicted not to fit. Skipped on a CPU and when forced."""
    from ..planner import planned_gpu

    if force or cfg.train.force or not (torch.cuda.is_available() or planned_gpu()):
        return None
    try:
        from ..planner import preflight
    except ImportError as e:  # pragma: no cover
        warnings.warn(f"nbtune: the memory planner is not available ({e}); training without a memory check",
                      RuntimeWarning, stacklevel=2)
        return None
    return preflight(cfg, gpu="auto", override_hint="train.force: true (--force on the magic / CLI, force=True)")


def checkpointing_mode(cfg: Config, plan=None):
    """The gradient checkpointing this run uses and why (one line), for ``nbtune.add_lora``: the
    planner's :func:`nbtune.planner.checkpointing_for_run` for this machine (its GPU and its RAM) and
    the launcher's world size, a (mode, why) pair whose ``offload_layers`` says how many layers to
    offload. ``plan``: the pre-flight plan of this config (:func:`check_fits`), which has resolved
    "auto" already: its choice is taken, not made again."""
    from ..planner import checkpointing_for_run

    return checkpointing_for_run(cfg, gpu_available=torch.cuda.is_available(), plan=plan,
                                 world_size=distributed.world_size())


def check_output_dir(out: Path) -> None:
    """A :class:`ConfigError` now, before anything is loaded or written, when ``output.dir`` cannot be
    created or written: it is a file, it is under a file, or its nearest existing folder is read-only."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir: {str(out)!r} is a file, not a folder; give a folder to write the run to")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"output.dir: {str(out)!r} cannot be created: {str(probe)!r} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir: {str(out)!r} is not writable ({str(probe)!r} is read-only); "
                          "give a folder you can write to")


def check_inputs(cfg: Config) -> None:
    """The cheap checks of a run, before any model is loaded and before anything is written: the
    output folder can be written, the model name resolves (a hub id the planner's catalog does not
    know: the hub answers and the model is not gated, nbtune/models/hub.py; a catalogued one is
    checked so before it loads, after the memory plan), max_seq_length is within a local
    model's limit, bitsandbytes imports where the config needs it (on a GPU), a local model folder
    holds safetensors weights and a tokenizer and has the modules lora.targets names, and the data
    source exists and its rows parse into conversations."""
    from ..assets import DATASETS, MODELS, is_pulled, model_dir
    from ..models.loader import check_checkpoint_files, check_model_name, check_seq_length, read_config
    from ..models.lora import check_targets_of_folder
    from ..planner.shapes import find_in_catalog
    from .data import _rename, check_splits, detect_format, load_rows, to_messages

    check_output_dir(output_dir(cfg))
    name = cfg.model.name
    check_model_name(name)
    local = model_dir(name) if name in MODELS and is_pulled(name) else Path(os.path.expanduser(name))
    if name not in MODELS and not local.is_dir() and find_in_catalog(name) is None:
        from ..models.hub import check_hub_model

        check_hub_model(name)  # a hub id the planner would fetch config.json for: reachable, not gated
    if (local / "config.json").is_file():
        check_seq_length(cfg.model.max_seq_length, read_config(str(local)), where=repr(name))
    check_bitsandbytes(cfg, torch.cuda.is_available())
    if (local / "config.json").is_file():
        check_checkpoint_files(local)  # safetensors weights and a tokenizer, before anything loads
        if not cfg.model.trust_remote_code:  # (building a custom-code model would run its code)
            check_targets_of_folder(local, cfg.lora.targets)
    if "gguf" in cfg.output.export:  # an architecture or quantizer the export lacks: said before training
        from ..export.api import check_gguf_export

        check_gguf_export(cfg, local if (local / "config.json").is_file() else None)
    source = Path(cfg.data.source).expanduser()
    if cfg.data.source in DATASETS or source.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet") \
            or source.exists():
        check_splits(cfg.data)  # a local file has one split: train
        rows, where = load_rows(cfg.data, cfg.data.split)
        rows = [_rename(r, cfg.data.columns) for r in rows]
        if cfg.train.method in PREFERENCE_METHODS:
            from .preference_data import check_rows

            return check_rows(rows, cfg.data, where)
        if cfg.train.method == "grpo":
            from .grpo_data import check_rows as check_prompt_rows

            return check_prompt_rows(rows, cfg, where)
        if not rows:
            from .data import DataError

            raise DataError(f"{where}: no rows")
        fmt = detect_format(rows[0].keys(), cfg.data)
        for n, row in enumerate(rows, 1):
            to_messages(row, fmt, f"{where} row {n}", cfg.data.system_prompt)


def _load_base(cfg: Config):
    if cfg.model.trust_remote_code:
        print(f"nbtune: model.trust_remote_code: true: loading {cfg.model.name} runs the Python code shipped with it "
              "(auto_map in its config); only for a source you trust", file=sys.stderr)
    return load_model(cfg.model.name, max_seq_length=cfg.model.max_seq_length, load_in_4bit=cfg.model.load_in_4bit,
                      dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)


def _load_tokenizer(cfg: Config):
    """The tokenizer for a dry run (a hub id is checked first: nbtune/models/hub.py). A dry run runs
    no code shipped with the model, whatever model.trust_remote_code says (it is a check, and
    nothing in it needs the code): the tokenizer loads without trust_remote_code, so a tokenizer
    that exists only as custom code is an error saying so."""
    from transformers import AutoTokenizer

    from ..models import ModelLoadError, resolve_model_path

    key = session.cached_model_key()
    if key == session.model_key(cfg):
        return session._SLOT["tokenizer"]
    path = resolve_model_path(cfg.model.name)
    if not Path(path).is_dir():  # a hub id: fails fast when the hub is off or away, or the model is gated
        from ..models.hub import check_hub_model

        check_hub_model(path)
    if cfg.model.trust_remote_code:
        print("nbtune: dry run: model.trust_remote_code is true, but a dry run runs no code shipped with the model; "
              "its tokenizer is loaded without it", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelLoadError(
            f"dry run: the tokenizer of {cfg.model.name} exists only as custom code shipped with the model (auto_map "
            "in its tokenizer_config.json), and a dry run runs no such code, so it cannot count tokens. Read that "
            "code first; a real run with model.trust_remote_code: true runs it") from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def _resume_point(out: Path, resume) -> Path | None:
    if not resume:
        return None
    if isinstance(resume, (str, Path)) and not isinstance(resume, bool):
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"resume: {str(path)!r} is not a checkpoint folder (no trainer_state.json)")
        if (path / MARKER).is_file() and (problem := checkpoint_problem(path)) is not None:
            raise ConfigError(f"resume: {str(path)!r} cannot be resumed from: {problem}. Resume from an earlier "
                              f"checkpoint in {path.parent}, or with resume=True to take the newest sound one")
        return path
    found = resumable_checkpoint(out, say=lambda text: print(text, file=sys.stderr))
    if found is None:
        print(f"nbtune: no complete checkpoint in {checkpoints_dir(out)}; starting from step 0", file=sys.stderr)
    return found


def _vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    return getattr(config, "vocab_size", None)


def check_resume(cfg: Config, out: Path, checkpoint: Path, say=None) -> None:
    """Before a resume: the saved run.yaml is the truth (only :data:`RESUME_MAY_CHANGE` may differ,
    and each change is stated); a run already at its last step is finished, not resumed."""
    saved_path = Path(out) / "run.yaml"
    if saved_path.is_file():
        try:
            saved = build_config(saved_path.read_text(encoding="utf-8"))
        except ConfigError:
            saved = None  # a run.yaml of an older schema: nothing to compare against
        for change in resume_changes(saved, cfg) if saved is not None else []:
            if say is not None:
                say(f"nbtune: resuming with {change}")
    step = checkpoint_step(checkpoint)
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        state = {}
    t = cfg.train
    done = (t.max_steps is not None and step >= t.max_steps) or (
        t.epochs is not None and float(state.get("epoch") or 0) >= t.epochs)
    if done:
        target = f"train.max_steps {t.max_steps}" if t.max_steps is not None else f"train.epochs {t.epochs}"
        raise ConfigError(f"resume: the run in {out} is finished ({checkpoint.name}, {target}); there is nothing to "
                          "resume. To train it further, raise train.max_steps (or train.epochs) and resume again; "
                          "its adapter is in " + str(Path(out) / "adapter"))


# settings a resumed run may change (each change is stated); any other change would make the
# resumed run a different run than the one its checkpoint belongs to
RESUME_MAY_CHANGE = {
    "train": {"max_steps", "epochs", "logging_steps", "eval_steps", "save_steps", "save_minutes", "force",
              "max_nonfinite_steps", "eval_batch_size"},
    "output": {"keep_checkpoints", "export", "merged_dtype", "gguf_quant", "overwrite"},
}


def resume_changes(saved: Config, cfg: Config) -> list[str]:
    """The allowed changes between the run's saved config and this one ("train.max_steps 6 -> 10");
    a :class:`ConfigError` naming each other change and what to do about it."""
    allowed, refused = [], []
    new = cfg.model_dump()
    for section, values in saved.model_dump().items():
        for key, old in values.items():
            if new[section][key] != old:
                text = f"{section}.{key} {old!r} -> {new[section][key]!r}"
                (allowed if key in RESUME_MAY_CHANGE.get(section, ()) else refused).append(text)
    if refused:
        raise ConfigError(
            "resume: this config differs from the run being resumed in " + ", ".join(refused) + ". A checkpoint "
            "continues the run it was saved by: set those back to the values in its run.yaml to resume, or "
            "start a new run in another output.dir. (Steps, epochs, logging, evaluation, saving and export "
            "settings may change on resume.)")
    return allowed


def prepare_run_data(cfg: Config, tokenizer) -> TokenizedData:
    """The run's tokenized data; with ``data.packing`` its train split packed into micro-batches
    (``data.packing`` then holds the :class:`~nbtune.train.packing.PackingStats`); with a preference
    method (dpo / orpo) the tokenized pairs of :mod:`nbtune.train.preference_data`."""
    if cfg.train.method in PREFERENCE_METHODS:
        from .preference_data import prepare_preference_data

        return prepare_preference_data(cfg.data, tokenizer, cfg.model.max_seq_length)
    if cfg.train.method == "grpo":  # prompt rows (nbtune/train/grpo_data.py)
        from .grpo_data import prepare_grpo_data

        return prepare_grpo_data(cfg, tokenizer, distributed.world_size())
    data = prepare_data(cfg.data, tokenizer, cfg.model.max_seq_length)
    if cfg.data.packing:
        data.train, data.packing = pack_dataset(data.train, cfg.train.batch_size, cfg.model.max_seq_length,
                                                packing_strategy(cfg.data.packing))
    return data


def build_trainer(cfg: Config, out: Path, model, tokenizer, data: TokenizedData, callbacks=(), **controls):
    """nbtune's SFTTrainer for this run (:mod:`nbtune.train.trainer`; ``controls``: its keyword
    arguments); with ``data.packing`` its collator is the padding-free one (position ids restarting
    at every document, ``cu_seq_lens``: no attention across documents). ``train.method`` dpo / orpo:
    nbtune's DPO / ORPO trainer (:mod:`nbtune.train.preference`); grpo: its GRPO trainer
    (:mod:`nbtune.train.grpo`)."""
    if cfg.train.method in PREFERENCE_METHODS:
        from .preference import build_preference_trainer

        return build_preference_trainer(cfg, out, model, tokenizer, data, callbacks, **controls)
    if cfg.train.method == "grpo":  # nbtune/train/grpo.py
        from .grpo import build_grpo_trainer

        return build_grpo_trainer(cfg, out, model, tokenizer, data, callbacks, **controls)
    collator = packed_collator(tokenizer.pad_token_id) if cfg.data.packing else None
    with quiet.loading():  # no datasets bars while TRL prepares the data (the dashboard is the view)
        return sft_trainer_class()(model=model, args=sft_args(cfg, out, model, data.eval is not None),
                                   train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                                   data_collator=collator, callbacks=list(callbacks), **controls)


# ---------------------------------------------------------------------------- entry points
def dry_run_report(config=None, gpu=None, resume=False, world_size: int | None = None, **overrides) -> DryRunReport:
    """Everything a run checks before training, without loading the model: config, plan,
    tokenizer and data (rows, tokens, steps). ``world_size``: the number of GPUs the run will
    use (default: the launcher's WORLD_SIZE), for the global batch and the steps per epoch."""
    cfg = build_config(config, **overrides)
    world = world_size or distributed.world_size()
    check_inputs(cfg)
    plan = memory_plan(cfg, gpu, world)
    tokenizer = _load_tokenizer(cfg)
    apply_chat_template_choice(tokenizer, cfg.data.chat_template)
    resume_from = _resume_point(output_dir(cfg), resume) if resume else None
    if cfg.train.method in PREFERENCE_METHODS:
        from .preference_data import dry_run_report as preference_report

        return preference_report(cfg, plan, tokenizer, world, resume_from)
    if cfg.train.method == "grpo":
        from .grpo_data import dry_run_report as grpo_report

        return grpo_report(cfg, plan, tokenizer, world, resume_from)
    data = prepare_data(cfg.data, tokenizer, cfg.model.max_seq_length)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    trained = sum(sum(1 for lab in labels if lab != -100) for labels in data.train["labels"])
    sample = tokenizer.decode(data.train[0]["input_ids"])
    packing = None
    # entries per epoch (rows, or packed micro-batches) and entries per optimizer step
    entries, per_step = len(lengths), distributed.global_batch(cfg, world)
    if cfg.data.packing:
        _, packing = pack_dataset(data.train, cfg.train.batch_size, cfg.model.max_seq_length,
                                  packing_strategy(cfg.data.packing))
        entries, per_step = packing.micro_batches, per_step // cfg.train.batch_size
    per_step = min(per_step, max(entries, 1))  # a step asking for more than the data holds trains it all once
    if cfg.train.max_steps:
        steps = cfg.train.max_steps
    else:
        steps = int(-(-entries * cfg.train.epochs // per_step))
    return DryRunReport(
        config=cfg, plan=plan, format=data.format, train_rows=len(lengths),
        eval_rows=0 if data.eval is None else data.eval.num_rows, dropped=data.dropped,
        train_tokens=sum(lengths), trainable_tokens=trained, longest=max(lengths), steps=steps,
        epochs=steps * per_step / entries, resume_from=resume_from,
        sample=sample, world_size=world, rows_truncated=data.truncated, packing=packing,
        notes=[n for n in (data.eval_note, None if cfg.data.packing else
                           batch_fit.oversized_batch_note(cfg, len(lengths), world)) if n],
    )


@dataclasses.dataclass
class _Run:
    """A run between its phases (:func:`prepare` -> :func:`train` -> :func:`finish`)."""

    cfg: Config
    out: Path
    main: bool  # rank 0 (or the only process): shows and writes the run
    plan: object
    checkpointing: CheckpointingChoice
    resume_from: Path | None
    start_step: int | None
    model: object  # the PeftModel
    tokenizer: object
    data: TokenizedData
    stream: MetricsStream
    trainer: object
    interrupt: InterruptCallback
    guard: NonFiniteGuard
    pauses: CollectorPauses
    t_start: float
    eval_before: float | None = None
    checkpoint: Path | None = None  # the checkpoint an interrupted run left

    @property
    def interrupted(self) -> bool:
        return self.interrupt.stopped_at is not None


@disk.explains_full_disk  # a full disk: which file, how much room is needed, what is kept
@released_on_oom  # out of GPU memory: the run's memory is released, the error carries the planner's advice
@run_folder.releases_locks
def finetune(config=None, *, plan: bool = False, dry_run: bool = False, resume=False, force: bool = False,
             gpu=None, listeners: list[Callable[[dict], None]] | None = None, model=None, tokenizer=None,
             progress: bool = True, reuse_model: bool = True, world_size: int | None = None, **overrides):
    """Run one fine-tune. ``config``: a Config, dict, YAML text or .yaml path; kwargs override sections.

    ``plan``: return the memory plan only. ``dry_run``: return a :class:`DryRunReport`.
    ``resume``: True (the latest complete checkpoint in output.dir) or a checkpoint folder.
    ``force``: train even when the planner predicts the run will not fit.
    ``listeners``: callables receiving each metrics record (the dashboard is one).
    ``model``/``tokenizer``: an already loaded (base) model to use instead of loading one; by default
    the model of the previous run in this process is reused when the config names the same one.
    ``world_size``: with ``plan``/``dry_run``, the number of GPUs to report the global batch for.

    Under torchrun / accelerate launch each process runs this on its own GPU (data parallel; see
    :mod:`nbtune.train.distributed`): listeners, progress and every file are rank 0's alone.
    """
    quiet.apply()  # third-party output the run makes irrelevant is hidden (nbtune/quiet.py)
    cfg = build_config(config, **overrides)
    if plan:
        return memory_plan(cfg, gpu, world_size)
    if dry_run:
        return dry_run_report(cfg, gpu=gpu, resume=resume, world_size=world_size)
    run = prepare(cfg, resume=resume, force=force, listeners=listeners, model=model, tokenizer=tokenizer,
                  progress=progress, reuse_model=reuse_model)
    train(run)
    return finish(run)


def offload_reserve(cfg: Config, mode: str) -> int | None:
    """Tokens of the run's longest micro-batch, for which offloaded checkpointing pins its host
    buffers once (``nbtune.kernels.offload.reserve_tokens``): batch_size x max_seq_length, twice that
    for DPO/ORPO (chosen and rejected in one forward); None for GRPO, whose generated lengths vary
    freely, and without offloading."""
    if mode != "offload" or cfg.train.method == "grpo":
        return None
    return cfg.train.batch_size * cfg.model.max_seq_length * (2 if cfg.train.method in PREFERENCE_METHODS else 1)


def prepare(cfg: Config, *, resume=False, force: bool = False, listeners=None, model=None, tokenizer=None,
            progress: bool = True, reuse_model: bool = True) -> _Run:
    """Everything before the first step: the checks (nothing loaded, nothing written when one fails),
    the memory plan and checkpointing mode, the model and the data, then the output folder, LoRA,
    the metrics stream and the trainer (and the held-out loss before training)."""
    distributed.setup_device()  # cuda:LOCAL_RANK before anything touches the GPU
    main = distributed.is_main_process()
    check_inputs(cfg)
    if main and not torch.cuda.is_available():
        print(cpu_note(cfg), file=sys.stderr)
    the_plan = check_fits(cfg, force)
    choice = checkpointing_mode(cfg, the_plan)  # (mode, why), with how many layers to offload
    if main and cfg.train.gradient_checkpointing == "auto":
        print(f"nbtune: gradient checkpointing auto -> {choice.mode} ({choice.reason})", file=sys.stderr)
    out = output_dir(cfg)
    disk.track(out, cfg)
    resume_from = _resume_point(out, resume)
    if resume_from is not None:
        check_resume(cfg, out, resume_from, say=(lambda text: print(text, file=sys.stderr)) if main else None)
    t_start = time.perf_counter()
    if model is None:
        model, tokenizer, _reused = session.get_base_model(cfg, lambda: _load_base(cfg), reuse=reuse_model)
    elif tokenizer is None:
        raise ValueError("finetune(model=...) needs the tokenizer too: finetune(..., model=m, tokenizer=t)")
    apply_chat_template_choice(tokenizer, cfg.data.chat_template)
    data = prepare_run_data(cfg, tokenizer)
    # only now, with the model loaded and the data tokenized, is anything in the output folder touched
    if main:
        open_output(cfg, out, fresh=resume_from is None)
        say_data_notes(cfg, data)
    peft_model = add_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=cfg.lora.targets,
                          gradient_checkpointing=choice.mode, offload_layers=choice.offload_layers,
                          seed=cfg.train.seed)
    session.attach(peft_model)
    reserve_tokens(offload_reserve(cfg, choice.mode))
    disk.track(out, cfg, peft_model)
    start_step = checkpoint_step(resume_from) if resume_from is not None else None
    before = None
    if resume_from is not None and main:  # the log continues from the checkpoint; its first held-out loss stays
        kept = truncate_log(out / "metrics.jsonl", start_step)
        before = next((r["eval_loss"] for r in kept if r.get("event") == "eval" and r.get("step") == 0), None)
    listeners = [*(listeners or []), *([TerminalProgress()] if progress else [])] if main else []
    stream = MetricsStream(out / "metrics.jsonl", listeners, append=resume_from is not None, write=main)
    stream.resumed_from = start_step
    stream.start_fields = dict(method=cfg.train.method, gradient_checkpointing=choice.mode,
                               checkpointing_reason=choice.reason, rows_truncated=data.truncated)
    if data.packing is not None:  # each packed entry is a micro-batch: the global batch is counted in row budgets
        stream.start_fields.update(packing=data.packing.as_dict(), global_batch=distributed.global_batch(cfg))
    pauses, interrupt = CollectorPauses(), InterruptCallback()
    stream.fields.append(pauses.record_fields)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, notify=stream.emit)
    trainer = build_trainer(cfg, out, peft_model, tokenizer, data, callbacks=[pauses, stream],
                            keep_checkpoints=cfg.output.keep_checkpoints, interrupt=interrupt,
                            autosave=AutoSave(cfg.train.save_minutes), guard=guard)
    run = _Run(cfg=cfg, out=out, main=main, plan=the_plan, checkpointing=choice, resume_from=resume_from,
               start_step=start_step, model=peft_model, tokenizer=tokenizer, data=data, stream=stream, trainer=trainer,
               interrupt=interrupt, guard=guard, pauses=pauses, t_start=t_start, eval_before=before)
    if data.eval is not None and resume_from is None:
        run.eval_before = trainer.evaluate()["eval_loss"]
    return run


def open_output(cfg: Config, out: Path, fresh: bool) -> None:
    """Take the output folder for this run (rank 0): its lock; a fresh run's check of what is there
    (:func:`run_folder.prepare_fresh`), a resumed one's leftover staging folders removed; run.yaml
    written and the files this run writes recorded as nbtune's."""
    out.mkdir(parents=True, exist_ok=True)
    run_folder.lock(out)  # released when finetune returns or raises
    if fresh:
        run_folder.prepare_fresh(out, cfg.output.overwrite)
    else:
        remove_stale_staging(out)
    (out / "run.yaml").write_text(cfg.to_yaml())
    # the adapter is named now, so that one cut short (a full disk, a kill) is still known as nbtune's
    run_folder.record_written(out, "run.yaml", "metrics.jsonl", "adapter")


def say_data_notes(cfg: Config, data: TokenizedData) -> None:
    """What the data preparation changed or found, on stderr: the held-out split, a batch larger
    than the data, dropped and truncated rows, how full the packed micro-batches are."""
    notes = [data.eval_note]
    # (grpo: a step's batch counts completions, and a step that asks for more prompts than the data has is refused)
    if not cfg.data.packing and cfg.train.method != "grpo":
        notes.append(batch_fit.oversized_batch_note(cfg, data.train.num_rows, distributed.world_size()))
    if data.dropped:
        notes.append("dropped train rows: " + ", ".join(f"{n} ({why})" for why, n in data.dropped.items()))
    if data.truncated:
        notes.append(f"{data.truncated} train rows are longer than max_seq_length={cfg.model.max_seq_length} tokens; "
                     "they keep their first max_seq_length tokens")
    if data.packing is not None:
        notes.append(data.packing.line())
    for note in filter(None, notes):
        print(f"nbtune: {note}", file=sys.stderr)


def train(run: _Run) -> None:
    """The training loop. A first interrupt (Ctrl-C, the notebook's stop button) stops after the
    current step with a checkpoint; a second aborts. NaN/inf steps in a row stop the run with the
    last good state kept (:func:`stop_diverged` raises)."""
    trainer, interrupt = run.trainer, run.interrupt
    message = "nbtune: interrupt received; stopping after this step and saving a checkpoint (interrupt again to abort)"
    try:
        with sigint_stops(interrupt, message):
            trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from is not None else None)
    except KeyboardInterrupt:
        if interrupt.requested:  # the second interrupt: abort without saving
            raise
        run.checkpoint = save_after_keyboard_interrupt(trainer)
        interrupt.stopped_at = trainer.state.global_step
        print(f"nbtune: interrupted at step {trainer.state.global_step}", file=sys.stderr)
    finally:
        run.pauses.close()  # the heap unfrozen however training ended
    if run.guard.stopped_at is not None:
        raise stop_diverged(run.guard, run.cfg, run.model, run.tokenizer, run.out, latest_checkpoint(run.out),
                            run.stream.emit, save=run.main)
    if run.interrupted:
        run.checkpoint = run.checkpoint or getattr(trainer, "nbtune_last_checkpoint", None) or latest_checkpoint(run.out)
        run.stream.emit(dict(event="interrupted", step=trainer.state.global_step, max_steps=trainer.state.max_steps,
                             checkpoint=str(run.checkpoint) if run.checkpoint else None))


def finish(run: _Run) -> FinetuneResult:
    """After the last step: the held-out loss, the replicas' agreement (data parallel), the collapse
    check, the adapter on disk, the result, and the exports the config asks for."""
    cfg, trainer, stream = run.cfg, run.trainer, run.stream
    after = None
    if run.data.eval is not None and not run.interrupted:
        try:
            after = trainer.evaluate()["eval_loss"]
        except KeyboardInterrupt:  # training is done: skip the held-out loss, keep the adapter
            print("nbtune: held-out evaluation interrupted; saving the adapter", file=sys.stderr)
    world = distributed.world_size()
    identical = replicas_agree(run) if world > 1 else None
    if not run.interrupted and (problem := collapse_problem(run.model, stream.history(), _vocab_size(run.model))):
        stream.emit(dict(event="collapsed", step=trainer.state.global_step, problem=problem))
        raise collapsed_error(problem, cfg, latest_checkpoint(run.out))
    adapter_dir = run.out / "adapter"
    if run.main:
        from .generate import save_adapter

        adapter_dir = save_adapter(run.model, run.tokenizer, adapter_dir)
    distributed.barrier()  # the adapter is on disk when any rank returns
    data = run.data
    result = FinetuneResult(
        config=cfg, output_dir=run.out, adapter_dir=adapter_dir, log_path=stream.path,
        eval_loss_before=run.eval_before, eval_loss_after=after, train_loss=mean_train_loss(stream.history()),
        steps=trainer.state.global_step, seconds=time.perf_counter() - run.t_start,
        metrics=stream.history(), model=run.model, tokenizer=run.tokenizer,
        interrupted=run.interrupted, checkpoint=run.checkpoint, resumed_from=run.start_step, plan=run.plan,
        gradient_checkpointing=run.checkpointing.mode, checkpointing_reason=run.checkpointing.reason,
        world_size=world, global_batch=distributed.global_batch(cfg, world), replicas_identical=identical,
        rows_truncated=data.truncated, packing=data.packing.as_dict() if data.packing is not None else None,
        _generation=session.generation(),
    )
    if cfg.output.save_merged and not run.interrupted and run.main:
        result.save_merged()
    if "gguf" in cfg.output.export and not run.interrupted and run.main:
        result.export("gguf")
    return result


def replicas_agree(run: _Run) -> bool:
    """Data parallel: every rank reports its LoRA weights' digest; rank 0 records (a ``distributed``
    event) and warns when they differ."""
    world = distributed.world_size()
    ranks = distributed.rank_reports(run.model)
    digests = [r["digest"] for r in ranks]
    identical = len(set(digests)) == 1
    run.stream.emit(dict(event="distributed", step=run.trainer.state.global_step, world_size=world,
                         global_batch=distributed.global_batch(run.cfg, world), replicas_identical=identical,
                         digests=digests, devices=[r["device"] for r in ranks],
                         peak_reserved_gib=[r["peak_reserved_gib"] for r in ranks]))
    if not identical and run.main:
        warnings.warn(f"nbtune: the LoRA weights differ between the {world} ranks after training (digests "
                      f"{digests}); the data-parallel run did not keep its replicas in step", RuntimeWarning,
                      stacklevel=3)
    return identical


def save_merged(peft_model, tokenizer, path: Path) -> Path:
    """Fold the adapter into a 16-bit copy of the base weights and save it as safetensors.

    Kept for callers of the first API; :meth:`FinetuneResult.save_merged` merges into a fresh
    16-bit copy of the base instead of the training model."""
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
