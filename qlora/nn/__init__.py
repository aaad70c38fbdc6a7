"""Modules: a frozen 4-bit linear layer and a LoRA wrapper that composes with it. Torch only."""

from .linear4bit import Linear4bit
from .lora import LoRALinear

__all__ = ["Linear4bit", "LoRALinear"]
