"""Tied-LoRA on a stacked expert weight of a mixture of experts. Each expert is treated as a
layer of its own: A (r x in) and B (out x r) are shared by every layer and every expert when tied
(one per layer and expert, (E, r, in) / (E, out, r), when not), and u (E, r), v (E, out) belong to
one layer, a row per expert. Expert e of a layer adds v_e * (B (u_e * (A x))), an ordinary LoRA
(A'_e = u_e A, B'_e = v_e B), so it merges into the expert weights and exports to PEFT's
parameter-target format. The update is folded into the weights at each forward (common/experts.py);
dropout does not apply to it."""

from __future__ import annotations

import torch
from torch import nn

from ..common.experts import ExpertsLayer, expert_layout
from .layer import TiedLoraBlock, TiedLoraLinear


class TiedExpertsBlock(TiedLoraBlock):
    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A' (E, r, in), B' (E, out, r)) of every expert."""
        experts = self.u.shape[0]
        A = self.A if self.A.dim() == 3 else self.A.expand(experts, *self.A.shape)
        B = self.B if self.B.dim() == 3 else self.B.expand(experts, *self.B.shape)
        return self.u[:, :, None] * A, self.v[:, :, None] * B

    def delta(self) -> torch.Tensor:
        A, B = self.scaled_factors()
        return torch.bmm(B, A)


class TiedLoraExperts(ExpertsLayer, TiedLoraLinear):
    def __init__(self, base_layer: nn.Module, param: str):
        layout = expert_layout(base_layer, param)
        TiedLoraLinear.__init__(self, base_layer, layout.features)
        self.param, self.num_experts, self.transposed = param, layout.num_experts, layout.transposed

    def _name(self) -> str | None:
        name = self.route.rows.single if self.route is not None else self.active_adapter
        return None if name is None or name in self.merged or name not in self.tied_lora else name

    def plain_delta(self) -> torch.Tensor | None:
        if self.route is not None and not self.route.rows.tenants:
            return None
        name = self._name()
        return None if name is None else self.tied_lora[name].delta()

    def group_delta(self, i: int) -> torch.Tensor | None:
        name = ([None] + self.route.rows.tenants)[i]  # a mixed batch: the rows of slot i
        if name is None or name not in self.tied_lora:
            return None
        with torch.no_grad():
            return self.tied_lora[name].delta()

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.oriented(self.tied_lora[name].delta())

    def merge(self, name: str) -> None:
        if name not in self.merged:
            self.fold(self.tied_lora[name].delta(), 1.0)
            self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.fold(self.tied_lora[name].delta(), -1.0)
            self.merged.remove(name)

    def peft_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E r, in), B (out, r E)) as PEFT stacks an expert weight's factors (B rank-major)."""
        A, B = (t.detach() for t in self.tied_lora[name].scaled_factors())
        experts, r = A.shape[:2]
        return A.reshape(experts * r, self.in_features), B.permute(1, 2, 0).reshape(self.out_features, r * experts)


TiedLoraLinear.experts_layer = TiedLoraExperts
