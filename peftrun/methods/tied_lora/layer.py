"""Tied-LoRA's modules: a layer's block computes the rank product u * (A x) once for a group (q, k
and v read one input) and each wrapped member adds its slice of v * B times it, in one fused
product-and-add (common/wrapper.py); A and B may be one Parameter shared by
every layer's block (tied). A mixed-tenant batch gathers each row's tensors once per batch (a
tied tensor once for every layer) and applies them with batched products."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..common.routing import RequestRows, Route
from ..common.wrapper import WrapperLayer, add_low_rank, rank_product


class TiedLoraBlock(nn.Module):
    """One layer's update on one group: v * (B (u * (A x))). A and B may be the same Parameter
    objects in every layer's block (tied); u and v are this layer's own.

    The members of a group (q, k, v) read the same input tensor, so the rank product is computed
    once and each member applies its slice of v * B; the cache is keyed by the input tensor itself."""

    def __init__(self, A: nn.Parameter, B: nn.Parameter, u: nn.Parameter, v: nn.Parameter,
                 dropout: float, num_members: int):
        super().__init__()
        self.A, self.B, self.u, self.v = A, B, u, v
        self.dropout = dropout
        self.num_members = num_members
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._uses = 0

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's plain-LoRA factors (A' = u*A, B' = v*B)."""
        return self.u[:, None] * self.A, self.v[:, None] * self.B

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """u * (A x) as (r, tokens), computed once for the group's members."""
        cache = self._cache
        version = 0 if x.is_inference() else x._version  # inference tensors have no counter
        if cache is not None and cache[0] is x and cache[1] == version:
            hT = cache[2]
            self._uses += 1
        else:
            hT = self.compute(x)
            self._cache, self._uses = (x, version, hT), 1
        if self._uses >= self.num_members:
            self._cache = None  # every member took its slice: hold no activations
        return hT

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout > 0:
            x = F.dropout(x.to(self.A.dtype), self.dropout, self.training)
        return rank_product(self.u[:, None] * self.A, x)

    def up(self, start: int, end: int) -> torch.Tensor:
        """(v * B) on output columns [start, end), transposed: add_low_rank's Bt."""
        return (self.v[start:end, None] * self.B[start:end]).t().contiguous()


class TiedRouting(Route):
    """One mixed-tenant batch on one backbone: the row-gathered tensors, shared by every layer
    (keyed by the identities of the tenants' tensors, so a tied A or B is gathered once), and
    each group's input product x A^T * u, computed once for its q, k and v."""

    def __init__(self, rows: RequestRows):
        super().__init__(rows)
        self.gathered: dict[tuple, torch.Tensor] = {}
        self.products: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}

    @torch.no_grad()
    def gather(self, kind: str, key: tuple, tensors: list[torch.Tensor | None], width: int, device) -> torch.Tensor:
        """Row i's tensor of kind "A" (r, in), "u" (r,), "B" (out, r) or "v" (out,): the
        tenants' tensors behind a zero slot, the rank axis zero-padded to `width`, per row.
        `key` names the tensors stably (a tied tensor has one key in every layer)."""
        key = (kind, width, key)
        if key not in self.gathered:
            real = [t for t in tensors if t is not None]
            shape = list(real[0].shape)
            rank_axis = 1 if kind == "B" else 0
            if kind != "v":  # v has no rank axis
                shape[rank_axis] = width
            stack = torch.zeros(len(tensors) + 1, *shape, device=device, dtype=real[0].dtype)
            for slot, t in enumerate(tensors, start=1):
                if t is not None:
                    stack[slot].narrow(rank_axis, 0, t.shape[rank_axis]).copy_(t)
            self.gathered[key] = stack.index_select(0, self.rows.slot.to(device))
        return self.gathered[key]

    def product(self, x: torch.Tensor, A: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(x A_i^T) * u_i per row i, (batch, tokens, r); reused while the same input comes back
        (q, k and v read one tensor). The input is held weakly: no activations are kept."""
        key = (id(A), id(u))
        version = 0 if x.is_inference() else x._version
        cached = self.products.get(key)
        if cached is not None and cached[0]() is x and cached[1] == version:
            return cached[2]
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)
        h = torch.bmm(flat, A.mT) * u[:, None, :]
        self.products[key] = (weakref.ref(x), version, h)
        return h



class TiedLoraLinear(WrapperLayer):
    """Wraps a frozen linear-like layer; per adapter name, the block it reads and its slice of
    the block's output."""

    held = "tied_lora"

    def __init__(self, base_layer: nn.Module, features: tuple[int, int] | None = None):
        super().__init__(base_layer, features)
        self.tied_lora = nn.ModuleDict()
        self.slices: dict[str, tuple[int, int]] = {}
        self._routed: tuple[TiedRouting, tuple[torch.Tensor, ...] | None] | None = None

    def add_adapter(self, name: str, block: TiedLoraBlock, start: int) -> None:
        self.tied_lora[name] = block
        self.slices[name] = (start, start + self.out_features)
        self.active_adapter = name

    def add_update(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        block = self.tied_lora[name]
        return add_low_rank(out, block.product(x), block.up(*self.slices[name]), self.fresh_output(out))

    def add_per_request(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """v_i * (B_i (u_i * (A_i x))) for each row i with its own adapter's tensors (this
        module's slice of B and v), as batched products (inference only: no dropout)."""
        route = self.route
        route.rows.check_batch(x.shape[0])
        if self._routed is None or self._routed[0] is not route:
            self._routed = (route, self._gather(route, x.device))
        factors = self._routed[1]
        if factors is None:  # no tenant of this batch adapts this module
            return out
        A, u, B, v = factors
        delta = torch.bmm(route.product(x, A, u), B.mT) * v[:, None, :]
        return out + delta.reshape(out.shape).to(out.dtype)

    def end_route(self) -> None:
        self.route, self._routed = None, None

    def _gather(self, route: TiedRouting, device) -> tuple[torch.Tensor, ...] | None:
        """Each row's A, u, and this module's slices of B and v (zeros: the backbone's rows)."""
        tenants = [n if n in self.tied_lora else None for n in route.rows.tenants]
        blocks = [self.tied_lora[n] if n is not None else None for n in tenants]
        if all(b is None for b in blocks):
            return None
        r = max(b.A.shape[0] for b in blocks if b is not None)
        slices = [self.slices[n] if n is not None else None for n in tenants]

        def key(c: str, sliced: bool = False) -> tuple:
            return tuple((id(getattr(b, c)), sl if sliced else None) if b is not None else None
                         for b, sl in zip(blocks, slices))

        def part(c: str, sliced: bool = False) -> list[torch.Tensor | None]:
            return [(getattr(b, c)[sl[0]:sl[1]] if sliced else getattr(b, c)) if b is not None else None
                    for b, sl in zip(blocks, slices)]

        return (route.gather("A", key("A"), part("A"), r, device), route.gather("u", key("u"), part("u"), r, device),
                route.gather("B", key("B", True), part("B", True), r, device),
                route.gather("v", key("v", True), part("v", True), r, device))

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B'[slice]) of this module: a standard LoRA with scale 1."""
        A, B = self.tied_lora[name].scaled_factors()
        start, end = self.slices[name]
        return A, B[start:end]

    def peft_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_factors(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_factors(name)
        return B @ A
