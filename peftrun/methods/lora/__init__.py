"""LoRA (Hu et al., 2021): h = W x + (alpha / r) B A x."""

from .config import LoraConfig
from .layer import LoraLinear
from .model import LoraAdapter, LoraMethod

__all__ = ["LoraConfig", "LoraLinear", "LoraAdapter", "LoraMethod"]
