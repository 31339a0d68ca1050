"""One validated config for every door into nbtune: the ``%%finetune`` cell, the CLI, the Python API.

The text forms (YAML cell body, YAML file) and keyword arguments all become a :class:`Config`.
Unknown keys, wrong types and out-of-range values are errors that name the field and what is
allowed there. Defaults are tuned for a free Colab T4 (a 7-8B model in 4-bit fits with them) and
for the embedded model on a CPU.

Numbers are numbers however they are written: YAML 1.1 (PyYAML) reads ``2e-4`` as the text
"2e-4"; nbtune's YAML loader follows YAML 1.2 there, and the schema accepts numeric text too, so
``lr: 2e-4``, ``lr: 2.0e-4``, ``lr: "2e-4"`` and ``lr=2e-4`` are the same float.

Sections (``Config.reference()`` prints every key with its default and allowed values):

- ``model``: name (embedded name, local directory or hub id), max_seq_length, load_in_4bit, dtype;
- ``data``: source, split, eval_split (a split name, a fraction of the train rows, or none),
  format + columns (mapping), chat_template, responses_only, packing, max_rows / eval_rows. Rows
  longer than ``model.max_seq_length`` tokens keep their first max_seq_length tokens (the run
  counts them: ``rows_truncated``). ``packing``: documents packed into micro-batches of
  batch_size x max_seq_length tokens, trained padding-free (attention restarts at each document):
  ``true``/``whole`` packs whole documents best-fit-decreasing, ``split`` lays them end to end and
  cuts the one that crosses a micro-batch's end (full micro-batches, a cut document's rest trained
  as a sequence of its own); it goes with ``responses_only`` (the labels outside the assistant
  turns stay -100) and the run reports how full the micro-batches are and how many documents were
  cut (:mod:`nbtune.train.packing`);
- ``lora``: r, alpha, dropout, targets;
- ``train``: method (``sft``, the default; ``dpo`` or ``orpo`` on preference pairs, with ``beta``:
  :mod:`nbtune.train.preference`; ``grpo`` on prompts, with the ``grpo`` section:
  :mod:`nbtune.train.grpo`), max_steps or epochs, batch_size, grad_accum, lr, scheduler,
  warmup_steps, optimizer (8-bit AdamW by default), weight_decay, seed, logging / eval / save steps, force (skip the
  memory check), max_nonfinite_steps (NaN/inf steps in a row before the run stops),
  gradient_checkpointing (``auto`` by default: see :func:`nbtune.planner.choose_checkpointing`);
- ``grpo`` (``train.method: grpo`` only): num_generations (completions sampled per prompt),
  max_completion_length, temperature, beta (the KL pull towards the model with LoRA off; 0 by
  default, as in TRL), rewards (built-in names or ``module:function``, :mod:`nbtune.train.rewards`),
  use_vllm;
- ``output``: dir, export (``adapter``, ``merged`` and/or ``gguf``, see :mod:`nbtune.export`),
  merged_dtype, gguf_quant, keep_checkpoints.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..assets.registry import DEFAULT_MODEL
from ..methods import PREFERENCE_METHODS, RL_METHODS


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and what is allowed."""


class _Section(BaseModel):
    # inf / nan are never a setting: lr: .inf would train to NaN weights and call them "good"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v, info):
        # pydantic reads true/false as 1/0 for a number; in a config that is a mistake, not a number
        ann = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and _numeric_not_bool(ann):
            raise ValueError(f"expected a number, not {str(v).lower()}; allowed: {_describe_type(ann)}")
        return v


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="embedded name, local checkpoint directory, or hub id")
    max_seq_length: int = Field(2048, gt=0, description="longest training sequence in tokens")
    load_in_4bit: Union[bool, None] = Field(None, description="4-bit NF4 base; None = on GPU yes, on CPU no")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    trust_remote_code: bool = False


DataFormat = Literal["auto", "messages", "prompt_completion", "instruction", "qa", "text", "preference", "prompt"]


class DataConfig(_Section):
    source: str = Field("gsm8k", description="embedded name (gsm8k), a local json/jsonl/csv/parquet file, or a hub id")
    split: str = "train"
    eval_split: Union[float, str, None] = Field(
        "auto", description="'auto' (an embedded data set's test split; 5% of a local file's rows, at least 1), "
                            "a split name (not for a local file: it has one split), a fraction of the train rows "
                            "to hold out (0 < x < 1), or null for no evaluation")
    format: DataFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="canonical name -> your column name")
    responses_only: bool = Field(True, description="train only on assistant / completion tokens")
    packing: Union[bool, Literal["whole", "split"]] = Field(
        False, description="pack rows into micro-batches of batch_size x max_seq_length tokens, padding-free, "
                           "attention restarting at each document; true or 'whole': whole rows best-fit-"
                           "decreasing (no row split; rows over max_seq_length are truncated); 'split': rows end "
                           "to end, a row cut where a micro-batch is full and its rest starting the next (every "
                           "micro-batch full); both work with responses_only")
    max_rows: Union[int, None] = Field(None, gt=0)
    eval_rows: Union[int, None] = Field(None, gt=0)
    system_prompt: Union[str, None] = None
    chat_template: Union[str, None] = Field(
        None, description="null: the tokenizer's own (chatml if it has none); 'chatml'; or a Jinja template")

    @field_validator("eval_split", mode="before")
    @classmethod
    def _eval_split(cls, v):
        if isinstance(v, bool):
            raise ValueError("eval_split is 'auto', a split name, a fraction between 0 and 1, or null")
        if isinstance(v, (int, float)) or (isinstance(v, str) and _NUMBER.fullmatch(v.strip())):
            x = float(v)
            if not 0 < x < 1:
                raise ValueError(f"a numeric eval_split is the fraction of train rows held out: 0 < x < 1, got {v}")
            return x
        return v


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: Union[str, list[str]] = "all-linear"


class TrainConfig(_Section):
    max_steps: Union[int, None] = Field(60, gt=0)
    epochs: Union[float, None] = Field(None, gt=0)
    batch_size: int = Field(2, gt=0)
    grad_accum: int = Field(4, gt=0)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: Union[int, float] = Field(
        0.03, ge=0, description="linear warm-up of the lr: a fraction of the run's steps (0 <= x < 1; the default "
                                "3% is at least one step) or a whole number of steps, fewer than max_steps")
    optimizer: Literal["adamw_8bit", "adamw", "paged_adamw_8bit", "sgd"] = "adamw_8bit"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    seed: int = Field(3407, ge=0, le=2**32 - 1)
    logging_steps: int = Field(1, gt=0)
    eval_steps: Union[int, None] = Field(None, gt=0)
    save_steps: Union[int, None] = Field(None, gt=0)
    save_minutes: Union[float, None] = Field(
        10.0, gt=0, description="a resumable checkpoint every this many minutes of training, and one at the end "
                                "(null: only save_steps and the end)")
    gradient_checkpointing: Literal["auto", "offload", "plain", "off"] = Field(
        "auto", description="'auto': offload on one GPU; data parallel (several GPUs): plain where the planner says "
                            "it fits, else offload. 'offload': saved hidden states in pinned CPU memory (least "
                            "GPU memory); 'plain': recompute only; 'off'")
    eval_batch_size: Union[int, None] = Field(None, gt=0)
    force: bool = Field(False, description="train even when the planner predicts the run will not fit")
    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_words(cls, v):
        # YAML 1.1 reads off / no / false as the boolean false: that can only mean 'off'
        if v is True:
            raise ValueError("true (YAML's reading of on / yes / true) does not say which mode: write 'auto', "
                             "'offload' or 'plain' (or 'off')")
        return "off" if v is False else v

    @field_validator("warmup_steps", mode="after")
    @classmethod
    def _warmup(cls, v):
        if isinstance(v, float) and v >= 1:
            if not v.is_integer():
                raise ValueError("a fraction of the steps is below 1 (e.g. 0.03); a number of steps is whole")
            return int(v)
        return v

    max_nonfinite_steps: int = Field(
        3, gt=0, description="stop after this many optimizer steps in a row with a NaN/inf loss or gradients "
                             "(each is skipped, not trained on; the last good checkpoint is kept)")
    method: Literal["sft", "dpo", "orpo", "grpo"] = Field(
        "sft", description="'sft': supervised fine-tuning on conversations; 'dpo' (direct preference optimization, "
                           "the reference is the model with LoRA switched off) or 'orpo' (odds-ratio preference "
                           "optimization, no reference) on preference rows {prompt, chosen, rejected}; 'grpo' "
                           "(group relative policy optimization) on prompt rows {prompt, answer?}: the model's own "
                           "completions scored by grpo.rewards (batch_size counts completions)")
    beta: float = Field(
        0.1, gt=0, description="dpo: the strength of the pull towards the reference (the implicit reward's scale); "
                               "orpo: the weight of the odds-ratio term next to the chosen replies' loss")

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_default_steps(cls, data):
        # epochs given without max_steps: train by epochs (max_steps' default does not apply)
        if isinstance(data, dict) and data.get("epochs") is not None and "max_steps" not in data:
            data = {**data, "max_steps": None}
        return data

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give train.max_steps or train.epochs")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(f"train.max_steps ({self.max_steps}) and train.epochs ({self.epochs}) conflict: "
                             "give one of them (set the other to null)")
        if isinstance(self.warmup_steps, int) and self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) is not below train.max_steps "
                             f"({self.max_steps}): the lr would never reach train.lr; give fewer warm-up steps or "
                             "a fraction such as 0.03")
        return self


ExportKind = Literal["adapter", "merged", "gguf"]
GgufQuant = Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]


class OutputConfig(_Section):
    dir: str = "outputs/nbtune-run"
    export: list[ExportKind] = Field(
        default_factory=lambda: ["adapter"],
        description="what to save after training: adapter (peft format), merged (16-bit, adapter folded in, "
                    "written shard by shard) and/or gguf (one file for llama.cpp / Ollama / LM Studio)")
    merged_dtype: Literal["float16", "bfloat16"] = "float16"
    gguf_quant: GgufQuant = Field("q8_0", description="GGUF weights: f16, bf16, q8_0, or llama.cpp's k-quants "
                                                      "q4_k_m, q5_k_m, q6_k (these need llama.cpp's quantizer)")
    keep_checkpoints: int = Field(2, ge=1, description="resumable checkpoints kept in <dir>/checkpoints")
    overwrite: bool = Field(False, description="a fresh run into a dir that holds a previous run replaces it (only "
                                               "the files nbtune wrote there are deleted); false: refused")

    @model_validator(mode="before")
    @classmethod
    def _save_merged_alias(cls, data):
        if isinstance(data, dict) and "save_merged" in data:  # the first schema's spelling
            data = dict(data)
            if data.pop("save_merged"):
                data["export"] = list(dict.fromkeys([*(data.get("export") or ["adapter"]), "merged"]))
        return data

    @field_validator("export", mode="before")
    @classmethod
    def _export_list(cls, v):
        return [v] if isinstance(v, str) else v

    @property
    def save_merged(self) -> bool:
        return "merged" in self.export


class GrpoConfig(_Section):
    num_generations: int = Field(
        4, ge=2, description="completions sampled per prompt; their rewards are compared within the group (at least "
                             "2). train.batch_size x grad_accum (completions per step) must be a multiple of it")
    max_completion_length: int = Field(256, gt=0, description="longest completion in tokens (a longer one is cut)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions")
    beta: float = Field(
        0.0, ge=0, description="the KL term's weight: the pull towards the model with LoRA off (no second copy); "
                               "0 (TRL's default) skips that forward")
    rewards: list[str] = Field(
        default_factory=lambda: ["correctness", "format"],
        description="reward functions, summed: 'correctness' (the final number matches the row's answer, GSM8K's "
                    "'#### N'), 'format' (the completion ends with '#### <number>'), or 'module:function' (a Python "
                    "function with TRL's reward signature: f(prompts, completions, **columns) -> list of floats)")
    use_vllm: Union[Literal["auto"], bool] = Field(
        "auto", description="generate with vLLM: 'auto' = when vllm is installed and the GPU has compute capability "
                            "8.0 or more; otherwise (and always on a CPU) the model's own generate with its KV cache")

    @field_validator("rewards", mode="before")
    @classmethod
    def _reward_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("rewards", mode="after")
    @classmethod
    def _known_rewards(cls, v):
        from .rewards import check_reward_names

        check_reward_names(v)  # a ValueError naming grpo.rewards and the fix
        return v


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v):
        return {"name": v} if isinstance(v, (str, Path)) else v

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, v):
        return {"source": str(v)} if isinstance(v, (str, Path)) else v

    @model_validator(mode="after")
    def _method_and_data(self):
        preference = self.train.method in PREFERENCE_METHODS
        if preference and self.data.packing:
            raise ValueError(f"train.method {self.train.method!r} trains on pairs of replies, which are not packed: "
                             "set data.packing: false (packing is for train.method: sft)")
        if preference and self.data.format not in ("auto", "preference"):
            raise ValueError(f"train.method {self.train.method!r} reads preference rows {{prompt, chosen, rejected}}, "
                             f"not data.format {self.data.format!r}: set data.format: auto (or preference), or "
                             "train.method: sft")
        if not preference and self.data.format == "preference":
            raise ValueError("data.format 'preference' (rows {prompt, chosen, rejected}) is for train.method dpo or "
                             "orpo; set train.method: dpo (or orpo), or another data.format for sft")
        return self._grpo_settings()

    def _grpo_settings(self):
        grpo, t = self.train.method in RL_METHODS, self.train
        if not grpo:
            if self.data.format == "prompt":
                raise ValueError("data.format 'prompt' (rows {prompt, answer}) is for train.method grpo; set "
                                 "train.method: grpo, or another data.format")
            changed = [k for k, v in self.grpo.model_dump().items() if v != GrpoConfig().model_dump()[k]]
            if changed:
                raise ValueError(f"grpo.{', grpo.'.join(changed)} set, but train.method is {t.method!r}: the grpo "
                                 "section is for train.method: grpo; set train.method: grpo or remove the grpo section")
            return self
        if self.data.packing:
            raise ValueError("train.method 'grpo' trains on the model's own completions, which are not packed: set "
                             "data.packing: false (packing is for train.method: sft)")
        if self.data.format not in ("auto", "prompt"):
            raise ValueError(f"train.method 'grpo' reads prompt rows {{prompt, answer}}, not data.format "
                             f"{self.data.format!r}: set data.format: auto (or prompt)")
        g = self.grpo
        per_step = t.batch_size * t.grad_accum
        if per_step % g.num_generations:
            accum = g.num_generations // math.gcd(g.num_generations, t.batch_size)
            fits = [n for n in range(2, per_step + 1) if per_step % n == 0]
            raise ValueError(
                f"train.batch_size x train.grad_accum = {per_step} completions per step is not a multiple of "
                f"grpo.num_generations ({g.num_generations}): a step holds whole groups of completions of one prompt. "
                f"Set train.grad_accum to a multiple of {accum}"
                + (f", or grpo.num_generations to one of {fits}" if fits else ""))
        if g.use_vllm is True and importlib.util.find_spec("vllm") is None:
            raise ValueError("grpo.use_vllm: true, but vllm is not installed: pip install vllm (on a CUDA GPU), or set "
                             "grpo.use_vllm: auto (generates with the model's own generate when vllm is missing)")
        if g.max_completion_length >= self.model.max_seq_length:
            raise ValueError(f"grpo.max_completion_length ({g.max_completion_length}) leaves no room for the prompt "
                             f"in model.max_seq_length ({self.model.max_seq_length}): lower it or raise "
                             "model.max_seq_length")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    @classmethod
    def reference(cls) -> str:
        """Every section and key with its default and what is allowed (the ``%%finetune?`` help)."""
        return config_reference()


SECTIONS = tuple(Config.model_fields)

# other libraries' names for nbtune's keys, for "did you mean" hints
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler", "optim": "optimizer",
    "warmup": "warmup_steps", "max_length": "max_seq_length", "seq_len": "max_seq_length", "path": "name",
    "model_name": "name", "id": "name", "load_in_4_bit": "load_in_4bit", "output_dir": "dir", "dataset": "source",
    "file": "source", "steps": "max_steps",
}


def _format_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line per bad field: its dotted name, what is allowed there, and what was given."""
    grouped: dict[tuple, list[dict]] = {}
    for e in err.errors():
        grouped.setdefault(_clean_loc(e["loc"], model), []).append(e)
    lines = []
    for loc_parts, errors in grouped.items():
        loc = ".".join(str(p) for p in loc_parts)
        e = errors[0]
        if e["type"] == "extra_forbidden":
            *parent, key = [str(p) for p in loc_parts]
            allowed = _allowed_keys(model, parent)
            hint = [ALIASES[key]] if ALIASES.get(key) in allowed else difflib.get_close_matches(key, allowed, n=1)
            msg = f"unknown key {loc!r}" + (f" (did you mean {'.'.join(parent + [hint[0]])!r}?)" if hint else "")
            msg += f"; allowed here: {', '.join(allowed)}"
        elif len(errors) > 1:  # a union: say what the field takes as a whole
            field = _field_at(model, loc_parts)
            allowed = _describe_type(field.annotation) if field is not None else "another value"
            msg = f"{loc}: expected {allowed} (got {_short(e.get('input'))})"
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a check across fields
            msg = e["msg"].removeprefix("Value error, ")
        else:
            text = e["msg"].removeprefix("Value error, ")
            field = _field_at(model, loc_parts)
            if e["type"] not in ("literal_error", "value_error") and field is not None:
                text += f"; allowed: {_describe_type(field.annotation)}{_bounds(field)}"
            msg = f"{loc}: {text} (got {_short(e.get('input'))})"
        lines.append(msg)
    return "invalid nbtune config:\n  " + "\n  ".join(lines)


def _clean_loc(loc, model) -> tuple:
    """Drop pydantic's union-member tags ('str', 'list[str]', 'none') from an error location."""
    out, current = [], model
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            continue
        fields = getattr(current, "model_fields", None)
        if fields is not None and part in fields:
            out.append(part)
            ann = fields[part].annotation
            current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif fields is not None:
            out.append(part)  # an unknown key: keep it so the message can name it
            current = None
    return tuple(out)


def _field_at(model, loc_parts):
    field = None
    for part in loc_parts:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        model = field.annotation
    return field


def _bounds(field) -> str:
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = [f"{ops[k]} {getattr(m, k)}" for m in field.metadata for k in ops if getattr(m, k, None) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for key in path:
        field = model.model_fields.get(key)
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def build_config(source: Any = None, **overrides) -> Config:
    """A :class:`Config` from a Config, a dict, YAML text, a path to a YAML file, and/or kwargs.

    Keyword overrides use section names: ``build_config(model="...", train={"max_steps": 10})``.
    """
    if isinstance(source, Config):
        data = source.model_dump()
    elif source is None:
        data = {}
    elif isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, (str, Path)):
        text = str(source)
        path = Path(text.strip()).expanduser() if "\n" not in text and ":" not in text else None
        if path is not None and (path.suffix or path.is_file()):
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8 "
                                  "(most editors: 'Save with encoding')") from None
        data = parse_yaml(text)
    else:
        raise ConfigError(f"a config is a Config, dict, YAML text or .yaml path, not {type(source).__name__}")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            base = dict(data[key])
            if key == "train":  # an override's max_steps / epochs replaces the other one of the source
                if value.get("epochs") is not None and "max_steps" not in value:
                    base["max_steps"] = None
                if value.get("max_steps") is not None and "epochs" not in value:
                    base["epochs"] = None
            data[key] = {**base, **value}
        else:
            data[key] = value
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, Config)) from None


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 2e-4 / 1E3 as floats (YAML 1.2), as people expect; nothing is evaluated.

    A key given twice in one mapping is an error (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(
                    f"the config gives {key!r} twice in one section (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); YAML would silently keep only the last one: delete one of them")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# a config is a few dozen values; aliases that expand past this many are a "billion laughs" input
_MAX_CONFIG_NODES = 10_000


def _count_nodes(value, budget: int) -> int:
    """Values in ``value`` with aliases expanded, stopping once past ``budget``."""
    count, stack = 0, [value]
    while stack and count <= budget:
        v = stack.pop()
        count += 1
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return count


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> dict:
    """YAML text -> dict; never evaluates anything (a SafeLoader)."""
    try:
        data = yaml.load(text, Loader=_Loader) if text.strip() else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"the config is not valid YAML: {e}") from None
    if data is None:
        return {}
    if _count_nodes(data, _MAX_CONFIG_NODES) > _MAX_CONFIG_NODES:
        raise ConfigError(f"the config expands to more than {_MAX_CONFIG_NODES:,} values (YAML anchors and aliases "
                          "nested inside each other); write the values out instead of aliasing them")
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    return data


def _numeric_not_bool(ann) -> bool:
    """A field that takes a number (int / float, maybe also text or null) and not a bool."""
    args = typing.get_args(ann) if typing.get_origin(ann) in (Union, types.UnionType) else (ann,)
    return bool(set(args) & {int, float}) and bool not in args


def _describe_type(ann) -> str:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a mapping of " + ", ".join(ann.model_fields)
    origin = typing.get_origin(ann)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " | ".join(_describe_type(a) for a in typing.get_args(ann))
    if origin in (list, dict):
        args = ", ".join(_describe_type(a) for a in typing.get_args(ann))
        return f"{origin.__name__}[{args}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def config_reference() -> str:
    """Plain-text reference of the schema: section, key, type / allowed values, default, description."""
    lines = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        lines.append(f"{section}:")
        for key, f in model.model_fields.items():
            default = f.get_default(call_default_factory=True)
            text = f"  {key}: {_describe_type(f.annotation)}{_bounds(f)} = {default!r}"
            if f.description:
                text += f"  # {f.description}"
            lines.append(text)
    return "\n".join(lines)


def output_dir(config: Config) -> Path:
    return Path(os.path.expanduser(config.output.dir))
