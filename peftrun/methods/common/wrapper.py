"""The wrapper layer of the LoRA family (LoRA, ALoRA, Tied-LoRA): a frozen linear-like layer
(nn.Linear, GPT-2's Conv1D, bitsandbytes 4/8-bit) with a low-rank update beside it, merged into
its weight on request. A method supplies the update (`update`, `per_request`, `delta_weight`).
Their export in PEFT's LoRA format is in peft_format.py."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from ..base import AdapterLayer, replace_module
from .experts import expert_parameters, wrap_expert
from .targets import linear_features


class WrapperLayer(AdapterLayer):
    experts_layer: type | None = None  # the family's layer on a stacked expert parameter, if any

    def __init__(self, base_layer: nn.Module, features: tuple[int, int] | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features or linear_features(base_layer)

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def unwrap_in(self, model: nn.Module, name: str) -> None:
        """Put the wrapped layer back in place of this wrapper (at `name`)."""
        replace_module(model, name, self.base_layer)

    def update(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """Adapter `name`'s addition to the output for input `x` (None: nothing to add)."""
        raise NotImplementedError

    def per_request(self, x: torch.Tensor) -> torch.Tensor:
        """The addition for a mixed-tenant batch: each row through its own adapter."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter `name`'s update as an (out, in) matrix."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.route is not None:
            rows = self.route.rows
            if not rows.tenants:
                return out  # every row on the backbone
            if rows.single is None:
                return out + self.per_request(x).to(out.dtype)
            name = rows.single  # every row on one adapter: the plain path
        if name is None or name in self.merged or name not in getattr(self, self.held):
            return out
        delta = self.update(x, name)
        return out if delta is None else out + delta.to(out.dtype)

    def _weight_and_delta(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.base_layer.weight
        if weight.__class__.__name__ in ("Params4bit", "Int8Params"):
            raise RuntimeError("merge needs an unquantized backbone: load it with model.quantization=null")
        delta = self.delta_weight(name)
        if isinstance(self.base_layer, Conv1D):  # Conv1D stores its weight as (in, out)
            delta = delta.T
        return weight, delta.to(weight.dtype)

    def merge(self, name: str) -> None:
        if name not in self.merged:
            weight, delta = self._weight_and_delta(name)
            weight.data += delta
            self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            weight, delta = self._weight_and_delta(name)
            weight.data -= delta
            self.merged.remove(name)


def wrap_targets(model: nn.Module, names: list[str], layer_type: type[WrapperLayer], method: str
                 ) -> dict[str, WrapperLayer]:
    """The `layer_type` wrapper of every module in `names`, wrapping those not wrapped yet; a
    stacked expert parameter among them gets the family's experts layer (`layer_type.experts_layer`,
    common/experts.py). Refuses a module another method's wrapper holds (one wrapper cannot hold
    the other's adapters): call before changing anything."""
    experts = expert_parameters(model)
    for name in names:
        module = model.get_submodule(experts[name][0] if name in experts else name)
        foreign = module
        while hasattr(foreign, "base_layer") and isinstance(foreign, AdapterLayer):
            if not isinstance(foreign, layer_type):
                raise ConfigError("method.name", f"{name} already holds a {type(foreign).__name__} adapter, which "
                                                 f"{method} cannot share; attach {method} to a backbone of its own")
            foreign = foreign.base_layer
        if name in experts and getattr(layer_type, "experts_layer", None) is None:
            raise ConfigError("method.targets", f"{name} is a stacked expert weight, which {method} does not adapt; "
                                                "name linear modules only")
    layers = {}
    for name in names:
        if name in experts:
            path, param = experts[name]
            layers[name] = wrap_expert(model, name, path, param, layer_type.experts_layer)
            continue
        module = model.get_submodule(name)
        if not isinstance(module, layer_type):
            module = layer_type(module)
            replace_module(model, name, module)
        layers[name] = module
    return layers
