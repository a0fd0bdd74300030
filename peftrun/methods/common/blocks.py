"""The model's list of Transformer blocks (Llama's `model.layers`, GPT-2's `transformer.h`)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def decoder_blocks(model: nn.Module, accept: Callable[[nn.Module], bool] = lambda block: True
                   ) -> tuple[str, nn.ModuleList] | None:
    """(full name, ModuleList) of the first module list as long as the config's layer count (any
    non-empty one without a config) whose first block `accept`s; None if there is none."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (n is None or len(module) == n) and accept(module[0]):
            return name, module
    return None
