"""LoraLinear: a frozen linear-like layer plus, per adapter name, A (r x in, random), B (out x r,
zero) and the scale s: out = W x + s * B A x. Per-module tensors live in ParameterDicts keyed by
adapter name, so several adapters can sit on one backbone without changing the module layout.

The update is one rank product (shared by the layers reading the same input: input_groups.py)
and one fused product-and-add into the frozen output (common/wrapper.py's add_low_rank). ALoRA
adds a 0/1 gate per rank: only the open ranks are computed (gates are 0 or 1, so the result is
the gated one). A mixed-tenant batch gathers each row's A and s B once per batch and applies them
with two batched products (the first shared by the input group), the second adding into the
output: the cost does not grow with the number of tenants. Where nothing is recorded for
autograd and the frozen layer is a plain linear, the update comes first and the frozen product
is accumulated into it (common/wrapper.py's frozen_into)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..common.routing import RequestRows
from ..common.wrapper import WrapperLayer, add_low_rank, rank_product
from .input_groups import InputGroup, per_row_product


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
        # Each row's (A, (s B)^T) of a mixed-tenant batch, gathered at its first forward.
        self._routed: tuple[RequestRows, torch.Tensor, torch.Tensor] | None = None
        self._pairs: dict[str, tuple] = {}  # name -> (what it was made from, tenant_pair's pair)
        self.scaling: dict[str, float] = {}
        self.input_group: InputGroup | None = None  # the layers reading this one's input (input_groups.py)
        self._open: dict[str, tuple[tuple, torch.Tensor | None]] = {}  # name -> (gate's identity, open slots)

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
        self._pairs.pop(name, None)

    def add_gate(self, name: str, live: int) -> None:
        """Gate the adapter's ranks: the first `live` open, the others closed."""
        gate = torch.zeros(self.lora_A[name].shape[0], device=self.lora_A[name].device)
        gate[:live] = 1.0
        self.lora_gate[name] = nn.Parameter(gate, requires_grad=False)
        self._open.pop(name, None)
        self._pairs.pop(name, None)

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

    # ------------------------------------------------------------------ one adapter for every row
    def open_slots(self, name: str) -> torch.Tensor | None:
        """The open rank slots of a gated adapter (None: every slot, or no gate). Cached while
        the gate is unchanged: the schedule, loads and copies change it in place, which bumps
        its version (writing through `.data` would not: do not)."""
        gate = self.lora_gate[name] if name in self.lora_gate else None
        if gate is None:
            return None
        key = (id(gate), gate._version, gate.device)
        cached = self._open.get(name)
        if cached is None or cached[0] != key:
            slots = torch.nonzero(gate).flatten()
            cached = self._open[name] = (key, None if slots.numel() == gate.numel() else slots)
        return cached[1]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s B) of adapter `name` on its open ranks. With none open they have no rank, yet
        stay in the graph: every parameter gets its (zero) gradient, as DDP expects."""
        A, B = self.lora_A[name], self.lora_B[name]
        slots = self.open_slots(name)
        if slots is not None:
            A, B = A.index_select(0, slots), B.index_select(1, slots)
        return A, B * self.scaling[name]

    def shares_input(self, name: str) -> bool:
        """Whether this layer's rank product for `name` may come from its input group's: the
        adapter applies to every row here, and no dropout draws a mask of its own."""
        if self.ablation_gate is not None or self.plain_adapter() != name or self.mixed_batch():
            return False
        return not (self.training and isinstance(self.lora_dropout[name], nn.Dropout))

    def low_rank_product(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A x as (r, tokens), s B) of adapter `name` on its open ranks, the rank product shared
        with the input group where it may be."""
        if self.input_group is not None and self.shares_input(name):
            return self.input_group.product(self, x, name)
        A, B = self.factors(name)
        return rank_product(A, self.lora_dropout[name](x)), B

    def add_update(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.ablation_gate is not None:
            return self._add_ablations(out, x, name)
        hT, B = self.low_rank_product(x, name)
        return add_low_rank(out, hT, B.t().contiguous(), self.fresh_output(out))

    def update(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        if self.ablation_gate is not None or self.lora_A[name].dtype != x.dtype:
            return None
        hT, B = self.low_rank_product(x, name)
        return hT.t() @ B.t()

    def _add_ablations(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """ALoRA's scoring: the batch is K stacked copies, copy k gated by `ablation_gate` row k
        (over `ablation_slots`, the slots open in some copy)."""
        if self.ablation_closed:
            return out  # every stacked copy has this module's ranks closed
        slots = self.ablation_slots
        A, B = self.lora_A[name][slots], self.lora_B[name][:, slots] * self.scaling[name]
        k = self.ablation_gate.shape[0]
        hT = rank_product(A, x).unflatten(1, (k, -1)) * self.ablation_gate.t()[:, :, None]
        return add_low_rank(out, hT.flatten(1), B.t().contiguous(), self.fresh_output(out))

    # ------------------------------------------------------------------ a mixed-tenant batch
    def add_per_request(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each batch row through its own adapter: A_i x_i (shared by the input group, as on
        the single-adapter path), then added through s_i B_i, as batched products over rows
        (inference only: dropout off, no gradient to the adapters). The rank product is kept as
        (r, tokens) per row, as on the single-adapter path; per row the two layouts time alike
        on CPUs (a 128-token prefill of 8 rows: within about 0.1 ms per product either way)."""
        hT, Bt = self.per_request_product(x)
        out3d = out.reshape(x.shape[0], -1, self.out_features)
        if out.dtype == Bt.dtype:
            # in place where nothing records it (generation): the frozen layer's fresh output
            add = torch.baddbmm if out.requires_grad else torch.Tensor.baddbmm_
            return add(out3d, hT.mT, Bt).view(out.shape)
        return (out3d + torch.bmm(hT.mT, Bt).to(out.dtype)).view(out.shape)

    def per_request_update(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.routed_factors(self.route.rows, x.device)[1].dtype != x.dtype:  # kept for the batch: cheap
            return None
        hT, Bt = self.per_request_product(x)
        return torch.bmm(hT.mT, Bt)

    def per_request_product(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's A_i x_i as (batch, r, tokens) and (s_i B_i)^T as (batch, r, out)."""
        rows = self.route.rows
        rows.check_batch(x.shape[0])
        if self.input_group is not None:
            return self.input_group.product_per_request(self, x, rows)
        A, Bt = self.routed_factors(rows, x.device)
        return per_row_product(A, x), Bt

    def routed_factors(self, rows: RequestRows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's A (batch, r, in) and (s B)^T (batch, r, out), gathered at the batch's first forward."""
        if self._routed is None or self._routed[0] is not rows:
            self._routed = (rows, *self._gather(rows, device))
        return self._routed[1], self._routed[2]

    def end_route(self) -> None:
        self.route, self._routed = None, None

    @torch.no_grad()
    def _gather(self, rows: RequestRows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's A (batch, r, in) on its open ranks and (s B)^T (batch, r, out), stacked from
        each tenant's pair (`tenant_pair`); zeros for the backbone's rows and for tenants that do
        not adapt this layer; ranks zero-padded to the largest."""
        pairs = [self.tenant_pair(n) if n in self.lora_A else None for n in rows.tenants]
        r = max([p[0].shape[0] for p in pairs if p is not None], default=1)
        dtype = next((p[0].dtype for p in pairs if p is not None), torch.float32)
        zero = (torch.zeros(r, self.in_features, device=device, dtype=dtype),
                torch.zeros(r, self.out_features, device=device, dtype=dtype))
        by_slot = [zero] + [zero if p is None else tuple(pad_rows(t.to(device, dtype), r) for t in p) for p in pairs]
        slots = rows.slot.tolist()
        return torch.stack([by_slot[i][0] for i in slots]), torch.stack([by_slot[i][1] for i in slots])

    @torch.no_grad()
    def tenant_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, (s B)^T) of adapter `name` on its open ranks, (r, in) and (r, out), kept while the
        adapter is unchanged: a mixed-tenant batch then stacks each layer's pairs instead of
        rebuilding them (per batch and layer, that was 4% of a 128-token prefill with 8 tenants).
        Changed means: a tensor written in place (its version), moved or loaded anew (its
        storage), the scale, or the adapter added or gated anew (which drop the pair)."""
        kept = self._pairs.get(name)
        if kept is None or kept[0] != self.scaling[name] or any(
                t._version != version or t.data_ptr() != storage for t, version, storage in kept[1]):
            tensors = [t for t in (self.lora_A[name], self.lora_B[name], self.lora_gate.get(name)) if t is not None]
            A, sB = self.factors(name)
            kept = self._pairs[name] = (self.scaling[name], [(t, t._version, t.data_ptr()) for t in tensors],
                                        A.detach(), sB.detach().t().contiguous())
        return kept[2], kept[3]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` (k, n) with zero rows appended up to `rows`."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])
