"""`method=lora`: the schema of peftrun/conf/method/lora.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import MethodConfig


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # "all-linear" (every linear layer but the output head), a list of module-name suffixes
    # (["q_proj", "v_proj"]), or a regular expression matched against full module names.
    targets: Any = "all-linear"
    init: str = "kaiming"  # kaiming | gaussian : A's init; B starts at zero
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
