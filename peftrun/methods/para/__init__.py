"""PARA, Prompt-Aware Representation Adjustment (Liu et al., EMNLP 2024 Industry)."""

from .config import ParaConfig
from .layer import ParaGenerator
from .model import ParaAdapter, ParaMethod

__all__ = ["ParaConfig", "ParaGenerator", "ParaAdapter", "ParaMethod"]
