"""Which modules of a backbone an adapter wraps."""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from ...models import output_head_names

ALL_LINEAR = "all-linear"


def is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; GPT-2 uses Conv1D; a layer
    # already wrapped by an adapter counts as the linear it wraps.
    if hasattr(module, "base_layer"):
        return is_linear(module.base_layer)
    return isinstance(module, (nn.Linear, Conv1D))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if hasattr(module, "base_layer"):
        return linear_features(module.base_layer)
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def find_targets(model: nn.Module, targets: Any, key: str = "method.targets") -> list[str]:
    """Names of the linear modules selected by `targets`: "all-linear" (all but the output
    head), a list of module-name suffixes, or a regular expression over full names."""
    heads = output_head_names(model)
    # Another adapter's own layers (IAPT's generators) are not the backbone's to adapt.
    owned = tuple(f"{name}." for name, m in model.named_modules() if getattr(m, "adapter_owned", False))
    linears = [
        name
        for name, m in model.named_modules()
        if is_linear(m) and name not in heads and not name.endswith(".base_layer") and not name.startswith(owned)
    ]
    if isinstance(targets, str) and targets == ALL_LINEAR:
        chosen = linears
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConfigError(key, f"invalid regular expression {targets!r} ({e})") from None
        chosen = [n for n in linears if pattern.fullmatch(n)]
    elif isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets):
        suffixes = list(targets)
        if ALL_LINEAR in suffixes:
            chosen = linears
        else:
            chosen = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
    else:
        raise ConfigError(
            key, f"expected 'all-linear', a list of module names or a regex, got {targets!r}"
        )
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            key,
            f"no linear module matches {targets!r}; this model has: {', '.join(kinds)} "
            f"(or use all-linear)",
        )
    return chosen
