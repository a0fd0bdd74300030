"""LoRA: h = W x + s * B A x with A (r x d_in) random, B (d_out x r) zero, s = alpha / r.

Per-module tensors live in ParameterDicts keyed by adapter name, so several adapters can sit on
one backbone (multi-tenant serving) without changing the module layout.
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
from .common import config_to_dict, layers_disabled, load_named, snapshot
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
        # Mixed-tenant batches: the adapter name of each batch row (None: the backbone alone).
        self.request_adapters: list[str | None] | None = None
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
        if self.request_adapters is not None:
            return out + self._per_request(x).to(out.dtype)
        name = self.active_adapter
        if name is None or name in self.merged:
            return out
        A, B = self.lora_A[name], self.lora_B[name]
        if self.ablation_gate is not None:
            if self.ablation_closed:
                return out  # every stacked copy has this module's ranks closed
            A, B = A[self.ablation_slots], B[:, self.ablation_slots]  # the slots open in some copy
        h = self.lora_dropout[name](x).to(A.dtype)
        return out + (F.linear(self._gated(F.linear(h, A), name), B) * self.scaling[name]).to(out.dtype)

    def _per_request(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row through its own adapter: the rows of one adapter are gathered and go
        through its two small products together (unmerged LoRA's cost per tenant)."""
        if len(self.request_adapters) != x.shape[0]:
            raise ValueError(f"{len(self.request_adapters)} request adapters for a batch of {x.shape[0]} rows")
        delta = torch.zeros(*x.shape[:-1], self.out_features, device=x.device)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.request_adapters):
            if name is not None and name not in self.merged:
                rows.setdefault(name, []).append(i)
        for name, idx in rows.items():
            if name not in self.lora_A:
                raise ValueError(f"no adapter named {name!r} on this model (have: {', '.join(self.lora_A)})")
            index = torch.tensor(idx, device=x.device)
            h = F.linear(x.index_select(0, index).to(self.lora_A[name].dtype), self.lora_A[name])
            if name in self.lora_gate:
                h = h * self.lora_gate[name]
            delta.index_copy_(0, index, F.linear(h, self.lora_B[name]) * self.scaling[name])
        return delta

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
        """Make this adapter the one its layers apply (several may share the layers)."""
        for layer in self.layers.values():
            layer.active_adapter = self.name

    @contextlib.contextmanager
    def routing(self, names: list[str | None]):
        """Within the context, batch row i goes through adapter names[i] (None: the backbone)
        on every layer these adapters share: one batch, many tenants."""
        for layer in self.layers.values():
            layer.request_adapters = list(names)
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.request_adapters = None

    def disabled(self) -> contextlib.AbstractContextManager:
        return layers_disabled(self.layers.values(), self.name)

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
