"""Tied-LoRA (Renduchintala, Konuk, Kuchaiev, NAACL 2024): A and B shared by every layer."""

from .config import PRESETS, TiedLoraConfig, resolve_flags
from .layer import TiedLoraBlock, TiedLoraLinear
from .model import TiedLoraAdapter, TiedLoraMethod

__all__ = ["PRESETS", "TiedLoraConfig", "resolve_flags", "TiedLoraBlock", "TiedLoraLinear", "TiedLoraAdapter",
           "TiedLoraMethod"]
