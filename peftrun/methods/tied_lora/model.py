"""Tied-LoRA (Renduchintala, Konuk, Kuchaiev, NAACL 2024): one A (r x d) and one B (out x r)
shared by every layer, scaled per layer by vectors u_i (r) and v_i (out):

    h_i = W_i x + v_i * (B (u_i * (A x)))        (alpha = r: no extra scale)

The default target "qkv" adapts the attention's q|k|v output as one fused projection (groups.py).
Per layer this is an ordinary LoRA (A' = u*A, B' = v*B), so it merges into W and exports as a
Hugging Face PEFT LoRA adapter. The flags (train, tie, init for A and B; train, init for u and v)
reach every freeze pattern of the family; presets fill them (config.py)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..base import DEFAULT_ADAPTER, Adapter, Method, freeze
from ..common.routing import RequestRows
from ..common.state import config_to_dict, unique_parameters
from ..common.peft_format import lora_peft_config, lora_peft_tensors, peft_keys
from ..common.wrapper import wrap_targets
from ..registry import register_method
from .config import COMPONENTS, TiedLoraConfig, resolve_flags
from .groups import find_groups
from .experts import TiedExpertsBlock, TiedLoraExperts
from .layer import TiedLoraBlock, TiedLoraLinear, TiedRouting


class TiedLoraAdapter(Adapter):
    method = "tied_lora"
    family = "tied_lora"
    layer_type = TiedLoraLinear
    wraps_projections = True
    supports_merge = True
    parameter_kinds = COMPONENTS

    def __init__(self, model: nn.Module, cfg: Any, name: str, layers: dict[str, TiedLoraLinear],
                 blocks: dict[tuple[str, str], TiedLoraBlock], flags: dict[str, Any]):
        super().__init__(model, cfg, name, layers)
        self.blocks = blocks  # (prefix, kind) -> block
        self.flags = flags

    def saved_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """Every tensor of the adapter, frozen ones included (a frozen random A/B must come back
        exactly, not re-drawn), each once: a tied A or B is named `<kind>.A`, per-layer ones
        `<prefix>.<kind>.<component>`. Loading copies into the one shared Parameter: re-tied."""
        named = []
        for (prefix, kind), block in self.blocks.items():
            for c in COMPONENTS:
                tied = c in "AB" and self.flags[f"tie_{c}"]
                named.append((f"{kind}.{c}" if tied else f"{prefix}.{kind}.{c}", getattr(block, c)))
        return unique_parameters(named)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        # From the flags, not requires_grad: attaching another adapter freezes the whole model.
        return [(n, p) for n, p in self.saved_tensors() if self.flags[f"train_{self.kind_of(n)}"]]

    def config_dict(self) -> dict[str, Any]:
        # Flags resolved, so a saved adapter reloads the same pattern whatever the preset says later.
        return {**config_to_dict(self.cfg), **self.flags, "target_modules": self.target_modules()}

    def make_route(self, rows: RequestRows) -> TiedRouting:
        return TiedRouting(rows)

    def peft_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A standard LoRA per module: A' = u*A, B' = (v*B)[this module's slice], scale 1
        (lora_alpha = r)."""
        keys = peft_keys(self.model, self.layers)
        with torch.no_grad():
            factors = {keys[mod]: layer.peft_factors(self.name) for mod, layer in self.layers.items()}
        r = int(self.cfg.r)
        config = lora_peft_config(self.model, self.layers, r, r, self.cfg.dropout, use_rslora=False)
        return config, lora_peft_tensors(factors)

    def unload(self, model: nn.Module) -> nn.Module:
        model = super().unload(model)
        self.blocks.clear()
        return model


@register_method
class TiedLoraMethod(Method):
    name = "tied_lora"
    config_class = TiedLoraConfig
    adapter_class = TiedLoraAdapter
    fsdp_unsupported = "its A and B are one tensor read by every layer, and FSDP shards layer by layer"

    def check_config(self) -> dict[str, Any]:
        c = self.cfg
        if c.r <= 0:
            raise ConfigError("method.r", f"the rank must be a positive integer, got {c.r}")
        if not 0.0 <= c.dropout < 1.0:
            raise ConfigError("method.dropout", f"must be in [0, 1), got {c.dropout}")
        return resolve_flags(c)

    def check_model(self, model: nn.Module) -> None:
        find_groups(model, self.cfg.targets)

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> TiedLoraAdapter:
        flags = self.check_config()
        groups = find_groups(model, self.cfg.targets)
        wrappers = wrap_targets(model, [m for g in groups for m in g.members], TiedLoraLinear, self.name)
        freeze(model)
        r = int(self.cfg.r)
        shared: dict[tuple[str, str], nn.Parameter] = {}  # (kind, "A"|"B") -> the tied tensor
        blocks: dict[tuple[str, str], TiedLoraBlock] = {}
        layers: dict[str, TiedLoraLinear] = {}
        for g in groups:
            first = wrappers[g.members[0]]
            device = first.base_weight().device
            d_in, d_out = first.in_features, sum(wrappers[m].out_features for m in g.members)
            experts = (first.num_experts,) if isinstance(first, TiedLoraExperts) else ()

            def matrix(c: str, shape: tuple[int, int]) -> nn.Parameter:
                if flags[f"tie_{c}"] and (g.kind, c) in shared:
                    return shared[(g.kind, c)]
                own = () if flags[f"tie_{c}"] else experts  # untied: one per layer (and expert)
                t = _init_matrix((math.prod(own) * shape[0], shape[1]), flags[f"init_{c}"], r, device)
                p = nn.Parameter(t.view(*own, *shape), requires_grad=flags[f"train_{c}"])
                if flags[f"tie_{c}"]:
                    shared[(g.kind, c)] = p
                return p

            def vector(c: str, size: int) -> nn.Parameter:
                t = torch.full((*experts, size), flags[f"init_{c}"], device=device, dtype=torch.float32)
                return nn.Parameter(t, requires_grad=flags[f"train_{c}"])

            block_type = TiedExpertsBlock if experts else TiedLoraBlock
            block = block_type(
                matrix("A", (r, d_in)), matrix("B", (d_out, r)), vector("u", r), vector("v", d_out),
                float(self.cfg.dropout), len(g.members),
            )
            blocks[(g.prefix, g.kind)] = block
            start = 0
            for name in g.members:
                wrappers[name].add_adapter(adapter_name, block, start)
                start += wrappers[name].out_features
                layers[name] = wrappers[name]
        return TiedLoraAdapter(model, self.cfg, adapter_name, layers, blocks, flags)


def _init_matrix(shape: tuple[int, int], init: str, r: int, device) -> torch.Tensor:
    t = torch.empty(shape, device=device, dtype=torch.float32)
    if init == "zeros":
        return t.zero_()
    if init == "gaussian":
        return nn.init.normal_(t, std=1.0 / r)
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # as nn.Linear, LoRA and VeRA
