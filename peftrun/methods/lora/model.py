"""LoRA's adapter and method: every target linear gets a rank-r LoraLinear adapter."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..base import DEFAULT_ADAPTER, Adapter, Method, freeze
from ..common.state import unique_parameters
from ..common.targets import find_targets
from ..common.peft_format import lora_peft_config, lora_peft_tensors, peft_keys
from ..common.wrapper import wrap_targets
from ..registry import register_method
from .config import LoraConfig
from . import experts  # noqa: F401  (LoraLinear's layer on stacked expert weights)
from .input_groups import link_input_groups
from .layer import LoraLinear


class LoraAdapter(Adapter):
    method = "lora"
    family = "lora"  # ALoRA's adapters live in the same LoraLinear layers
    layer_type = LoraLinear
    wraps_projections = True
    supports_merge = True
    parameter_kinds = ("lora_A", "lora_B")

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return unique_parameters(
            (f"{mod}.lora_{kind}", getattr(layer, f"lora_{kind}")[self.name])
            for mod, layer in self.layers.items()
            for kind in ("A", "B")
        )

    def saved_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"{name}.weight", p) for name, p in self.trainable_parameters()]

    def peft_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) of every module, as PEFT's LoRA holds them, by PEFT's module key."""
        keys = peft_keys(self.model, self.layers)
        return {keys[mod]: layer.peft_factors(self.name) for mod, layer in self.layers.items()}

    def peft_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        c = self.cfg
        config = lora_peft_config(self.model, self.layers, c.r, c.alpha, c.dropout, use_rslora=bool(c.use_rslora),
                                  init_lora_weights="gaussian" if c.init == "gaussian" else True)
        return config, lora_peft_tensors(self.peft_factors())

    def unload(self, model: nn.Module) -> nn.Module:
        model = super().unload(model)
        link_input_groups(model, LoraLinear)  # no group may name a layer taken out
        return model


@register_method
class LoraMethod(Method):
    name = "lora"
    config_class = LoraConfig
    adapter_class = LoraAdapter

    def check_config(self) -> None:
        if self.cfg.r <= 0:
            raise ConfigError("method.r", f"the rank must be a positive integer, got {self.cfg.r}")
        self.check_factors()

    def check_factors(self) -> None:
        """alpha, dropout and init: shared by the LoRA family (ALoRA too)."""
        c = self.cfg
        if c.alpha <= 0:
            raise ConfigError("method.alpha", f"must be positive, got {c.alpha}")
        if not 0.0 <= c.dropout < 1.0:
            raise ConfigError("method.dropout", f"must be in [0, 1), got {c.dropout}")
        if c.init not in ("kaiming", "gaussian"):
            raise ConfigError("method.init", f"choose kaiming or gaussian, got {c.init!r}")

    def check_model(self, model: nn.Module) -> None:
        find_targets(model, self.cfg.targets)

    def scaling(self) -> float:
        c = self.cfg
        return c.alpha / math.sqrt(c.r) if c.use_rslora else c.alpha / c.r

    def inject(self, model: nn.Module, adapter_name: str, r: int) -> dict[str, LoraLinear]:
        """Freeze the backbone and give every target module a rank-r adapter `adapter_name`."""
        names = find_targets(model, self.cfg.targets)
        layers = wrap_targets(model, names, LoraLinear, self.name)
        freeze(model)
        for layer in layers.values():
            layer.add_adapter(adapter_name, r, self.scaling(), self.cfg.dropout, self.cfg.init)
        link_input_groups(model, LoraLinear)
        return layers

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> LoraAdapter:
        self.check_config()
        return self.adapter_class(model, self.cfg, adapter_name, self.inject(model, adapter_name, self.cfg.r))
