"""Which modules of a backbone an adapter wraps."""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from ...models import output_head_names
from .experts import expert_parameters, innermost

ALL_LINEAR = "all-linear"


def is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; GPT-2 uses Conv1D; a layer
    # already wrapped by an adapter counts as the linear it wraps (an experts wrapper does not).
    if getattr(module, "param", None) is not None and hasattr(module, "num_experts"):
        return False
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
    """Names of the linear modules and stacked expert parameters (common/experts.py) selected by
    `targets`: "all-linear" (all but the output head and the experts' routers), a list of
    module-name suffixes (an experts module's name selects its expert parameters), or a regular
    expression over full names."""
    heads = output_head_names(model)
    # Another adapter's own layers (IAPT's generators) are not the backbone's to adapt.
    owned = tuple(f"{name}." for name, m in model.named_modules() if getattr(m, "adapter_owned", False))
    linears = [
        name
        for name, m in model.named_modules()
        if is_linear(m) and name not in heads and not name.endswith(".base_layer") and not name.startswith(owned)
        and ".base_layer." not in name
    ]
    experts = expert_parameters(model)
    candidates = linears + list(experts)
    if isinstance(targets, str) and targets == ALL_LINEAR:
        chosen = _all_linear(model, linears, experts)
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConfigError(key, f"invalid regular expression {targets!r} ({e})") from None
        chosen = [n for n in candidates if pattern.fullmatch(n)]
    elif isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets):
        suffixes = list(targets)
        if ALL_LINEAR in suffixes:
            chosen = _all_linear(model, linears, experts)
        else:
            def named(n: str) -> bool:
                names = [n] + ([experts[n][0]] if n in experts else [])
                return any(m == s or m.endswith("." + s) for m in names for s in suffixes)

            chosen = [n for n in candidates if named(n)]
    else:
        raise ConfigError(
            key, f"expected 'all-linear', a list of module names or a regex, got {targets!r}"
        )
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError(
            key,
            f"no linear module matches {targets!r}; this model has: {', '.join(kinds)} "
            f"(or use all-linear)",
        )
    return chosen


def _all_linear(model: nn.Module, linears: list[str], experts: dict) -> list[str]:
    skip = routers(model) if experts else set()
    return [n for n in linears if n not in skip] + list(experts)


def routers(model: nn.Module) -> set[str]:
    """Linear layers beside an experts module that score the experts (one output per expert, or
    one gate: Qwen2-MoE's shared_expert_gate): left frozen by all-linear."""
    out = set()
    experts = {path for path, _ in expert_parameters(model).values()}
    for path in experts:
        parent_path = path.rpartition(".")[0]
        parent = model.get_submodule(parent_path) if parent_path else model
        count = next(p.shape[0] for p in innermost(model.get_submodule(path)).parameters(recurse=False)
                     if p.dim() == 3)
        for name, child in parent.named_children():
            if is_linear(child) and linear_features(child)[1] in (1, count):
                out.add(f"{parent_path}.{name}" if parent_path else name)
    return out
