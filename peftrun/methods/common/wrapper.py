"""The wrapper layer of the LoRA family (LoRA, ALoRA, Tied-LoRA): a frozen linear-like layer
(nn.Linear, GPT-2's Conv1D, bitsandbytes 4/8-bit) with a low-rank update beside it, merged into
its weight on request. A method supplies the update (`update`, `per_request`, `delta_weight`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from ..base import AdapterLayer, replace_module
from .targets import linear_features


class WrapperLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)

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
    """The `layer_type` wrapper of every module in `names`, wrapping those not wrapped yet.
    Refuses a module another method's wrapper holds (one wrapper cannot hold the other's
    adapters): call before changing anything."""
    for name in names:
        module = model.get_submodule(name)
        if hasattr(module, "base_layer") and not isinstance(module, layer_type):
            raise ConfigError("method.name", f"{name} already holds a {type(module).__name__} adapter, which "
                                             f"{method} cannot share; attach {method} to a backbone of its own")
    layers = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, layer_type):
            module = layer_type(module)
            replace_module(model, name, module)
        layers[name] = module
    return layers


def lora_peft_config(layers: dict[str, WrapperLayer], r: int, alpha: float, dropout: float, **fields: Any
                     ) -> dict[str, Any]:
    """The fields of PEFT's LoraConfig for a LoRA-format export of adapters on `layers`.
    `fan_in_fan_out` only tells PEFT how a base weight is laid out (GPT-2's Conv1D)."""
    alpha = float(alpha)
    return {
        "peft_type": "LORA",
        "r": int(r),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(dropout),
        "target_modules": sorted(layers),
        "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in layers.values()),
        "bias": "none",
        **fields,
    }


def lora_peft_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(A (r x in), B (out x r)) per module -> PEFT's tensor names (A and B keep this layout for
    Conv1D too)."""
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.detach().clone().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.detach().clone().contiguous()
    return tensors
