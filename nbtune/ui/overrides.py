"""``--set section.key=value``: one config value given on the line, read the same way by both
doors that take it (``nbtune finetune run.yaml --set ...`` and ``%%finetune --set ...``). The value
is YAML read with the config's own rules (:func:`nbtune.train.config.parse_yaml`: 2e-4 is a float,
nothing is evaluated); a dotted key nests (``lora.targets=[q_proj, v_proj]``)."""
from __future__ import annotations

from ..train.config import Config, ConfigError, build_config, parse_yaml


def dotted_override(item: str) -> dict:
    """'train.lr=1e-4' -> {'train': {'lr': 1e-4}}. An item quoted whole ("'output.dir=my runs'") is
    unquoted first: a shell removes those quotes before ``nbtune`` sees them, IPython's split of a
    magic's line keeps them, and both doors must read the same item alike."""
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
        item = item[1:-1]
    key, sep, value = item.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value (e.g. train.lr=1e-4), got {item!r}")
    try:
        parsed = parse_yaml(f"v: {value}")["v"]
    except ConfigError:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML (quote it, e.g. {key}='...')") from None
    for part in reversed(parts[1:]):
        parsed = {part: parsed}
    return {parts[0]: parsed}


def apply_overrides(cfg, items) -> Config:
    """``cfg`` (anything :func:`build_config` takes) with each ``--set`` item applied in order."""
    cfg = build_config(cfg)
    for item in items or []:
        cfg = build_config(cfg, **dotted_override(item))
    return cfg
