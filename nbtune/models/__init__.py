"""Model loading and LoRA: where weights come from and how the model is set up for training."""
from .loader import ModelLoadError, load_model, resolve_model_path
from .lora import add_lora, load_adapter

__all__ = ["ModelLoadError", "add_lora", "load_adapter", "load_model", "resolve_model_path"]
