"""IAPT, Instruction-Aware Prompt Tuning (Zhu et al., ACL 2024)."""

from .config import IaptConfig
from .layer import IaptLayer, SoftPromptGenerator, attention_modules
from .model import IaptAdapter, IaptMethod

__all__ = ["IaptConfig", "IaptLayer", "SoftPromptGenerator", "attention_modules", "IaptAdapter", "IaptMethod"]
