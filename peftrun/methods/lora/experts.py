"""LoRA (and ALoRA) on a stacked expert parameter of a mixture of experts: per expert e its own
rank-r update, W_e + s B_e A_e. The experts' factors are stacked so that a rank slot is one row of
A and one column of B, as for a linear layer (ALoRA's gates and slot moves apply unchanged):

    A: (E r, in), rows e r .. (e+1) r - 1 are expert e's A_e
    B: (out, E r), the same columns are expert e's B_e;  gate: (E r,)

The update is folded into the expert weights at each forward (the module's own code then runs
the experts, whatever its kernel), as PEFT's parameter targets do; dropout does not apply to it.
Hugging Face PEFT's layout differs only in B's column order (rank-major): see `peft_factors`."""

from __future__ import annotations

import torch
from torch import nn

from ..common.experts import ExpertsLayer, expert_layout
from .layer import LoraLinear


class LoraExperts(ExpertsLayer, LoraLinear):
    def __init__(self, base_layer: nn.Module, param: str):
        layout = expert_layout(base_layer, param)
        LoraLinear.__init__(self, base_layer, layout.features)
        self.param, self.num_experts, self.transposed = param, layout.num_experts, layout.transposed

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str) -> None:
        super().add_adapter(name, r * self.num_experts, scaling, 0.0, init)

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0] // self.num_experts

    def add_gate(self, name: str, live: int) -> None:
        """The first `live` slots of every expert open."""
        super().add_gate(name, 0)
        self.lora_gate[name].data.view(self.num_experts, -1)[:, :live] = 1.0

    def free_slots(self, name: str) -> list[int]:
        """Closed slots, the experts' first free ones first (new ranks spread over the experts)."""
        r = self.rank(name)
        free = torch.nonzero(self.lora_gate[name] == 0).flatten().tolist()
        return sorted(free, key=lambda s: (s % r, s // r))

    def expert_delta(self, name: str, gate: torch.Tensor | None = None) -> torch.Tensor:
        """s B_e diag(g_e) A_e for every expert: (E, out, in)."""
        A, B = self.lora_A[name], self.lora_B[name]
        if gate is None and name in self.lora_gate:
            gate = self.lora_gate[name]
        if gate is not None:
            A = A * gate[:, None]
        e = self.num_experts
        A = A.view(e, -1, self.in_features)
        B = B.view(self.out_features, e, -1).transpose(0, 1)
        return torch.bmm(B, A) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.oriented(self.expert_delta(name))

    def _name(self) -> str | None:
        """The adapter every row uses (a route with one tenant included); None: none applies."""
        name = self.active_adapter
        if self.route is not None:
            name = self.route.rows.single
        return None if name is None or name in self.merged or name not in self.lora_A else name

    def plain_delta(self) -> torch.Tensor | None:
        if self.route is not None and not self.route.rows.tenants:
            return None
        name = self._name()
        return None if name is None else self.expert_delta(name)

    def group_delta(self, i: int) -> torch.Tensor | None:
        if self.ablation_gate is not None:  # ALoRA's scoring: copy i of the batch, with row i's gates
            name = self._name()
            if name is None or self.ablation_closed:
                return None
            gate = torch.zeros_like(self.lora_gate[name])
            gate[self.ablation_slots] = self.ablation_gate[i]
            return self.expert_delta(name, gate)
        name = ([None] + self.route.rows.tenants)[i]  # a mixed batch: the rows of slot i
        if name is None or name not in self.lora_A:
            return None
        with torch.no_grad():
            return self.expert_delta(name)

    def merge(self, name: str) -> None:
        if name not in self.merged:
            self.fold(self.expert_delta(name), 1.0)
            self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.fold(self.expert_delta(name), -1.0)
            self.merged.remove(name)

    def peft_factors(self, name: str, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E r', in), B (out, r' E)) in PEFT's layout (B rank-major: column j E + e), r' the most
        open slots of any expert among `slots` (all: None); an expert with fewer gets zero ranks."""
        e, r = self.num_experts, self.rank(name)
        A, B = self.lora_A[name].detach(), self.lora_B[name].detach()
        if slots is None:
            slots = torch.arange(e * r)
        per_expert = [slots[(slots >= i * r) & (slots < (i + 1) * r)] for i in range(e)]
        width = max(len(s) for s in per_expert)
        A_out = A.new_zeros(e, width, self.in_features)
        B_out = B.new_zeros(self.out_features, width, e)
        for i, own in enumerate(per_expert):
            A_out[i, : len(own)] = A[own]
            B_out[:, : len(own), i] = B[:, own]
        return A_out.reshape(e * width, self.in_features), B_out.reshape(self.out_features, width * e)


LoraLinear.experts_layer = LoraExperts
