"""Training: one config -> data pipeline -> TRL SFTTrainer -> metrics stream -> adapter on disk."""
from .config import Config, ConfigError, build_config
from .data import DataError, prepare_data
from .metrics import MetricsStream, read_log
from .run import FinetuneResult, finetune

__all__ = ["Config", "ConfigError", "DataError", "FinetuneResult", "MetricsStream", "build_config", "finetune",
           "prepare_data", "read_log"]
