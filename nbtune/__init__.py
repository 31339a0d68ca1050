"""nbtune: notebook-first QLoRA/LoRA fine-tuning of 7-8B LLMs on a free Colab T4."""
__version__ = "0.1.0"
