"""One validated config for every door into nbtune: the ``%%finetune`` cell, the CLI, the Python API.

The text forms (YAML cell body, YAML file) and keyword arguments all become a :class:`Config`.
Unknown keys, wrong types and out-of-range values are errors that name the field. Defaults are
tuned for a free Colab T4 (a 7-8B model in 4-bit fits with them) and for the embedded model on
a CPU.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..assets.registry import DEFAULT_MODEL


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="embedded name, local checkpoint directory, or hub id")
    max_seq_length: int = Field(2048, gt=0, description="longest training sequence in tokens")
    load_in_4bit: Union[bool, None] = Field(None, description="4-bit NF4 base; None = on GPU yes, on CPU no")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    trust_remote_code: bool = False


DataFormat = Literal["auto", "messages", "prompt_completion", "instruction", "qa", "text"]


class DataConfig(_Section):
    source: str = Field("gsm8k", description="embedded name (gsm8k), a local json/jsonl/csv/parquet file, or a hub id")
    split: str = "train"
    eval_split: Union[str, None] = Field("auto", description="'auto': the source's held-out split if it has one")
    format: DataFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="canonical name -> your column name")
    responses_only: bool = Field(True, description="train only on assistant / completion tokens")
    packing: bool = False
    max_rows: Union[int, None] = Field(None, gt=0)
    eval_rows: Union[int, None] = Field(None, gt=0)
    system_prompt: Union[str, None] = None


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
    warmup_steps: int = Field(5, ge=0)
    optimizer: Literal["adamw_8bit", "adamw", "paged_adamw_8bit", "sgd"] = "adamw_8bit"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    seed: int = 3407
    logging_steps: int = Field(1, gt=0)
    eval_steps: Union[int, None] = Field(None, gt=0)
    save_steps: Union[int, None] = Field(None, gt=0)
    gradient_checkpointing: Literal["offload", "plain", "off"] = "offload"
    eval_batch_size: Union[int, None] = Field(None, gt=0)

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give train.max_steps or train.epochs")
        return self


class OutputConfig(_Section):
    dir: str = "outputs/nbtune-run"
    save_merged: bool = Field(False, description="also save a merged 16-bit checkpoint")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v):
        return {"name": v} if isinstance(v, (str, Path)) else v

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, v):
        return {"source": str(v)} if isinstance(v, (str, Path)) else v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


SECTIONS = tuple(Config.model_fields)


def _format_error(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            *parent, key = [str(p) for p in e["loc"]]
            allowed = _allowed_keys(model, parent)
            hint = difflib.get_close_matches(key, allowed, n=1)
            msg = f"unknown key {loc!r}" + (f" (did you mean {'.'.join(parent + [hint[0]])!r}?)" if hint else "")
            msg += f"; allowed here: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg = f"{loc}: {e['msg']} (got {e.get('input')!r})"
        else:
            msg = f"{loc}: {e['msg']} (got {e.get('input')!r})"
        lines.append(msg)
    return "invalid nbtune config:\n  " + "\n  ".join(lines)


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
        if "\n" not in text and text.strip().endswith((".yaml", ".yml")):
            path = Path(text).expanduser()
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            text = path.read_text(encoding="utf-8")
        data = parse_yaml(text)
    else:
        raise ConfigError(f"a config is a Config, dict, YAML text or .yaml path, not {type(source).__name__}")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, Config)) from None


def parse_yaml(text: str) -> dict:
    """YAML text -> dict; never evaluates anything (safe_load)."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"the config is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    return data


def output_dir(config: Config) -> Path:
    return Path(os.path.expanduser(config.output.dir))
