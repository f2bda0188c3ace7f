"""nomoat: open LLaMA-style models and their LoRA adapters on phones and Raspberry Pis."""

__version__ = "0.1.0"
