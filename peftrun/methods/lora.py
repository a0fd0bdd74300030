"""LoRA: h = W x + s * B A x with A (r x d_in) random, B (d_out x r) zero, s = alpha / r.

Per-module tensors live in ParameterDicts keyed by adapter name, so several adapters can sit on
one backbone (multi-tenant serving) without changing the module layout. A mixed-tenant batch
(`LoraAdapter.routing`) gathers each row's A and B once per batch and applies them with two
batched products per layer: the cost does not grow with the number of tenants.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from .base import freeze, unique_parameters
from .common import (RequestRows, activate_only, adapter_layers, check_tenants, check_unmerged, check_unwrapped,
                     config_to_dict, layer_tenants, layers_disabled, load_named, snapshot)
from .targets import find_targets, linear_features

DEFAULT = "default"


class LoraLinear(nn.Module):
    """Wraps a frozen linear-like layer (nn.Linear, GPT-2 Conv1D, bitsandbytes 4/8-bit)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        # Optional 0/1 gate per rank (ALoRA), never trained. A (K, r) `ablation_gate` makes the
        # batch K stacked copies of one batch, copy k gated by row k: many ablations, one forward.
        self.lora_gate = nn.ParameterDict()
        self.ablation_gate: torch.Tensor | None = None
        self.ablation_closed = False  # ablation_gate is all zero
        self.ablation_slots: torch.Tensor | None = None  # columns of ablation_gate: these slots
        # Mixed-tenant batches: the adapter of each batch row, and each row's (A, B, scale)
        # gathered at the first forward of the routing context.
        self.route: RequestRows | None = None
        self._routed: tuple[RequestRows, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged: list[str] = []

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        weight = self.base_layer.weight
        device = weight.device if weight.device.type != "meta" else "meta"
        A = torch.empty(r, self.in_features, device=device, dtype=torch.float32)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:  # kaiming-uniform with a=sqrt(5), as nn.Linear and PEFT initialize
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        self.active_adapter = name

    def add_gate(self, name: str, live: int) -> None:
        """Gate the adapter's ranks: the first `live` open, the others closed."""
        gate = torch.zeros(self.lora_A[name].shape[0], device=self.lora_A[name].device)
        gate[:live] = 1.0
        self.lora_gate[name] = nn.Parameter(gate, requires_grad=False)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B diag(gate) A as an (out, in) matrix."""
        A = self.lora_A[name]
        if name in self.lora_gate:
            A = A * self.lora_gate[name][:, None]
        return (self.lora_B[name] @ A) * self.scaling[name]

    def _gated(self, h: torch.Tensor, name: str) -> torch.Tensor:
        if self.ablation_gate is not None:
            k = self.ablation_gate.shape[0]
            return (h.unflatten(0, (k, -1)) * self.ablation_gate.view(k, 1, *([1] * (h.dim() - 2)), -1)).flatten(0, 1)
        if name in self.lora_gate:
            return h * self.lora_gate[name]
        return h

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.route is not None:
            if not self.route.tenants:
                return out  # every row on the backbone
            if self.route.single is None:
                return out + self._per_request(x).to(out.dtype)
            name = self.route.single  # every row on one adapter: the plain path
        if name is None or name in self.merged or name not in self.lora_A:
            return out
        A, B = self.lora_A[name], self.lora_B[name]
        if self.ablation_gate is not None:
            if self.ablation_closed:
                return out  # every stacked copy has this module's ranks closed
            A, B = A[self.ablation_slots], B[:, self.ablation_slots]  # the slots open in some copy
        h = self.lora_dropout[name](x).to(A.dtype)
        return out + (F.linear(self._gated(F.linear(h, A), name), B) * self.scaling[name]).to(out.dtype)

    def _per_request(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row through its own adapter: x_i A_i^T, then B_i, as two batched products
        over rows (inference only: dropout off, no gradient to the adapters)."""
        rows = self.route
        rows.check_batch(x.shape[0])
        if self._routed is None or self._routed[0] is not rows:
            self._routed = (rows, *self._gather(rows, x.device))
        _, A, B, scale = self._routed
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)  # (batch, tokens, in)
        delta = torch.bmm(torch.bmm(flat, A.mT), B.mT) * scale
        return delta.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def _gather(self, rows: RequestRows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's A (batch, r, in) with its gate folded in, B (batch, out, r) and scale
        (batch, 1, 1): the tenants stacked behind a zero slot (the backbone's rows, and tenants
        that do not adapt this layer), ranks zero-padded to the largest, then indexed per row."""
        tenants = [n if n in self.lora_A else None for n in rows.tenants]
        r = max([self.lora_A[n].shape[0] for n in tenants if n is not None], default=1)
        dtype = next((self.lora_A[n].dtype for n in tenants if n is not None), torch.float32)
        A = torch.zeros(len(tenants) + 1, r, self.in_features, device=device, dtype=dtype)
        B = torch.zeros(len(tenants) + 1, self.out_features, r, device=device, dtype=dtype)
        scale = torch.zeros(len(tenants) + 1, device=device, dtype=dtype)
        for slot, name in enumerate(tenants, start=1):
            if name is None:
                continue
            a = self.lora_A[name]
            if name in self.lora_gate:
                a = a * self.lora_gate[name][:, None]  # 0/1 per rank: exact either way
            A[slot, : a.shape[0]] = a
            B[slot, :, : a.shape[0]] = self.lora_B[name]
            scale[slot] = self.scaling[name]
        slot = rows.slot.to(device)
        return A.index_select(0, slot), B.index_select(0, slot), scale.index_select(0, slot).view(-1, 1, 1)

    def _base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if weight.__class__.__name__ in ("Params4bit", "Int8Params"):
            raise RuntimeError(
                "merge needs an unquantized backbone: load it with model.quantization=null"
            )
        return weight

    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        weight = self._base_weight()
        delta = self.delta_weight(name)
        if isinstance(self.base_layer, Conv1D):
            delta = delta.T
        weight.data += delta.to(weight.dtype)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        weight = self._base_weight()
        delta = self.delta_weight(name)
        if isinstance(self.base_layer, Conv1D):
            delta = delta.T
        weight.data -= delta.to(weight.dtype)
        self.merged.remove(name)


class LoraAdapter:
    method = "lora"
    supports_merge = True

    def __init__(self, model: nn.Module, layers: dict[str, LoraLinear], cfg: Any, name: str):
        self.model = model
        self.layers = layers
        self.cfg = cfg
        self.name = name

    # -- parameters and state
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named = (
            (f"{mod}.lora_{kind}", getattr(layer, f"lora_{kind}")[self.name])
            for mod, layer in self.layers.items()
            for kind in ("A", "B")
        )
        return unique_parameters(named)

    def parameter_counts(self) -> dict[str, int]:
        counts = {"lora_A": 0, "lora_B": 0}
        for name, p in self.trainable_parameters():
            counts["lora_" + name.rsplit("_", 1)[-1]] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        return snapshot((f"{name}.weight", p) for name, p in self.trainable_parameters())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_named({f"{name}.weight": p for name, p in self.trainable_parameters()}, state)

    def config_dict(self) -> dict[str, Any]:
        return {**config_to_dict(self.cfg), "target_modules": sorted(self.layers)}

    def peft_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The adapter in Hugging Face PEFT's format (see peftrun.export): the LoraConfig fields,
        and the tensors keyed `base_model.model.<module>.lora_{A,B}.weight` (A is r x in and B
        out x r for Conv1D too; `fan_in_fan_out` only tells PEFT how the base weight is laid out)."""
        c = self.cfg
        tensors: dict[str, torch.Tensor] = {}
        for mod, layer in self.layers.items():
            for kind in ("A", "B"):
                param = getattr(layer, f"lora_{kind}")[self.name]
                tensors[f"base_model.model.{mod}.lora_{kind}.weight"] = param.detach().clone().contiguous()
        alpha = float(c.alpha)
        config = {
            "peft_type": "LORA",
            "r": int(c.r),
            "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
            "lora_dropout": float(c.dropout),
            "target_modules": sorted(self.layers),
            "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in self.layers.values()),
            "use_rslora": bool(c.use_rslora),
            "bias": "none",
            "init_lora_weights": "gaussian" if c.init == "gaussian" else True,
        }
        return config, tensors

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def callbacks(self) -> list[Any]:
        return []

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None) -> None:
        pass  # LoRA does not depend on which tokens are the prompt

    # -- switching
    def activate(self) -> None:
        """Make this adapter the only one the model applies (several may share the layers;
        layers it does not adapt apply none)."""
        activate_only(self.shared_layers(), self.name, "lora_A")

    def shared_layers(self) -> list[LoraLinear]:
        """Every LoRA layer of the backbone, whichever adapter (LoRA or ALoRA) put it there."""
        return adapter_layers(self.model, LoraLinear)

    def tenants(self) -> list[str]:
        """Names of every LoRA-family adapter on the backbone."""
        return layer_tenants(self.shared_layers(), "lora_A")

    @contextlib.contextmanager
    def routing(self, names: list[str | None]):
        """Within the context, batch row i goes through adapter names[i] (None: the backbone)
        on every LoRA layer of the backbone: one batch, many tenants. Inference only."""
        layers = self.shared_layers()
        check_tenants(names, layer_tenants(layers, "lora_A"))
        check_unmerged(layers)
        rows = RequestRows(names)
        for layer in layers:
            layer.route = rows
        try:
            yield
        finally:
            for layer in layers:
                layer.route, layer._routed = None, None

    def disabled(self) -> contextlib.AbstractContextManager:
        return layers_disabled(self.shared_layers(), self.name)

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge(self.name)

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge(self.name)


class LoraMethod:
    name = "lora"

    def __init__(self, cfg: Any):
        self.cfg = cfg

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
        check_unwrapped(model, names, LoraLinear, self.name)
        freeze(model)
        layers: dict[str, LoraLinear] = {}
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, LoraLinear):
                parent_name, _, child = name.rpartition(".")
                module = LoraLinear(module)
                setattr(model.get_submodule(parent_name), child, module)
            module.add_adapter(adapter_name, r, self.scaling(), self.cfg.dropout, self.cfg.init)
            layers[name] = module
        return layers

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT) -> LoraAdapter:
        self.check_config()
        return LoraAdapter(model, self.inject(model, adapter_name, self.cfg.r), self.cfg, adapter_name)
