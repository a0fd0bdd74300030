"""LoraLinear: a frozen linear-like layer plus, per adapter name, A (r x in, random), B (out x r,
zero) and the scale s: out = W x + s * B A x. Per-module tensors live in ParameterDicts keyed by
adapter name, so several adapters can sit on one backbone without changing the module layout.

A mixed-tenant batch gathers each row's A and B once per batch and applies them with two batched
products: the cost does not grow with the number of tenants. ALoRA adds a 0/1 gate per rank."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common.routing import RequestRows
from ..common.wrapper import WrapperLayer


class LoraLinear(WrapperLayer):
    held = "lora_A"

    def __init__(self, base_layer: nn.Module, features: tuple[int, int] | None = None):
        super().__init__(base_layer, features)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        # Optional 0/1 gate per rank (ALoRA), never trained. A (K, r) `ablation_gate` makes the
        # batch K stacked copies of one batch, copy k gated by row k: many ablations, one forward.
        self.lora_gate = nn.ParameterDict()
        self.ablation_gate: torch.Tensor | None = None
        self.ablation_closed = False  # ablation_gate is all zero
        self.ablation_slots: torch.Tensor | None = None  # columns of ablation_gate: these slots
        # Each row's (A, B, scale) of a mixed-tenant batch, gathered at its first forward.
        self._routed: tuple[RequestRows, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        weight = self.base_weight()
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

    def free_slots(self, name: str) -> list[int]:
        """Closed rank slots, in the order new ranks take them."""
        return torch.nonzero(self.lora_gate[name] == 0).flatten().tolist()

    def peft_factors(self, name: str, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as PEFT's LoRA holds them, restricted to rank `slots` (all: None)."""
        A, B = self.lora_A[name], self.lora_B[name]
        return (A, B) if slots is None else (A[slots], B[:, slots])

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

    def update(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        A, B = self.lora_A[name], self.lora_B[name]
        if self.ablation_gate is not None:
            if self.ablation_closed:
                return None  # every stacked copy has this module's ranks closed
            A, B = A[self.ablation_slots], B[:, self.ablation_slots]  # the slots open in some copy
        h = self.lora_dropout[name](x).to(A.dtype)
        return F.linear(self._gated(F.linear(h, A), name), B) * self.scaling[name]

    def per_request(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row through its own adapter: x_i A_i^T, then B_i, as two batched products
        over rows (inference only: dropout off, no gradient to the adapters)."""
        rows = self.route.rows
        rows.check_batch(x.shape[0])
        if self._routed is None or self._routed[0] is not rows:
            self._routed = (rows, *self._gather(rows, x.device))
        _, A, B, scale = self._routed
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)  # (batch, tokens, in)
        delta = torch.bmm(torch.bmm(flat, A.mT), B.mT) * scale
        return delta.reshape(*x.shape[:-1], self.out_features)

    def end_route(self) -> None:
        self.route, self._routed = None, None

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
