"""One rank product for the LoRA layers that read the same input. A decoder block's q, k and v
projections read one normalized hidden state, and so do a gated MLP's gate and up: their A's are
concatenated and x A_cat^T is computed once, each layer taking its rows (one pass over the
activations instead of three, and one gradient product back to them instead of three). A
mixed-tenant batch shares the same way: each row's A's concatenated, one batched product.

The groups come from the block's layout (common/layouts.py), so the product a group computes is
fixed by the model and the adapter, never by what was seen before: a recomputed forward (gradient
checkpointing) runs the same operations as the original. At run time a member reuses the product
only for the very tensor it was computed from (same object, same version); anything else (an
architecture whose siblings read different inputs) computes afresh, so sharing can waste work
but never change a result."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..common.blocks import decoder_blocks
from ..common.layouts import LayoutError, attention_layout, mlp_layout
from ..common.routing import RequestRows
from ..common.wrapper import rank_product


def _version(x: torch.Tensor) -> int:
    return 0 if x.is_inference() else x._version  # inference tensors have no version counter


@dataclass
class _Product:
    x: torch.Tensor
    version: int
    key: object  # the adapter's name, or the mixed-tenant batch's rows
    hT: torch.Tensor  # (sum of the members' ranks, tokens), per batch row in a mixed-tenant batch
    rows: dict  # member -> (first rank row, rank, its up-projection)
    pending: set = field(default_factory=set)  # members yet to take their rows


def per_row_product(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each batch row's A x, with A (batch, r, in) and x (batch, ..., in), as (batch, r, tokens)."""
    return torch.bmm(A, x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype).mT)


class InputGroup:
    """Sibling LoRA layers that read one input tensor; `product` gives each its rank product,
    `product_per_request` the same for a mixed-tenant batch (each row through its own adapter)."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._cache: _Product | None = None

    def product(self, layer: nn.Module, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A x as (r, tokens), s B) of `layer`'s adapter `name` on its open ranks."""
        return self._shared(layer, x, name, lambda m: m.shares_input(name), lambda m: m.factors(name), rank_product)

    def product_per_request(self, layer: nn.Module, x: torch.Tensor, rows: RequestRows
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_i x_i as (batch, r, tokens), (s_i B_i)^T as (batch, r, out)) of `layer` in the
        mixed-tenant batch routed by `rows`: every row through its own adapter."""
        return self._shared(layer, x, rows, lambda m: m.mixed_batch() and m.route.rows is rows,
                            lambda m: m.routed_factors(rows, x.device), per_row_product)

    def _shared(self, layer, x, key, shares, factors_of, multiply) -> tuple[torch.Tensor, torch.Tensor]:
        """One `multiply` of the sharing members' concatenated A's (rank on dim -2) with `x`,
        computed at the first member's call and sliced by each member in turn."""
        c = self._cache
        if c is not None and c.x is x and c.key == key and layer in c.pending and c.version == _version(x):
            c.pending.discard(layer)
            if not c.pending:
                self._cache = None  # every member took its rows: hold no activations
            start, r, B = c.rows[layer]
            return c.hT[..., start:start + r, :], B
        sharing = [m for m in self.members if m is layer or shares(m)]
        if len(sharing) == 1:
            A, B = factors_of(layer)
            return multiply(A, x), B
        factors = {m: factors_of(m) for m in sharing}
        hT = multiply(torch.cat([A for A, _ in factors.values()], dim=-2), x)
        rows, start = {}, 0
        for m, (A, B) in factors.items():
            rows[m] = (start, A.shape[-2], B)
            start += A.shape[-2]
        self._cache = _Product(x, _version(x), key, hT, rows, set(sharing) - {layer})
        start, r, B = rows[layer]
        return hT[..., start:start + r, :], B


def input_groups(model: nn.Module) -> list[list[str]]:
    """Module names, per decoder block, of the linears that read one input: the attention's
    q, k, v (where they are separate linears) and a gated MLP's gate and up."""
    found = decoder_blocks(model)
    config = getattr(model, "config", None)
    if found is None or config is None:
        return []
    prefix, blocks = found
    groups = []
    for i, block in enumerate(blocks):
        try:
            attention = attention_layout(config, block)
            mlp = mlp_layout(config, block, attention.path)
        except (LayoutError, AttributeError, TypeError, ValueError):
            continue  # no layout to read: every layer computes its own product
        path = f"{prefix}.{i}"
        groups.append([f"{path}.{m}" for m in attention.inputs])
        if mlp.gate is not None and mlp.up is not None and mlp.gate.module != mlp.up.module:
            groups.append([f"{path}.{mlp.gate.module}", f"{path}.{mlp.up.module}"])
    return groups


def link_input_groups(model: nn.Module, layer_type: type) -> None:
    """Give every `layer_type` layer of the model its group (None: it reads its input alone);
    called after each attach, as a new adapter may wrap more modules."""
    layers = {name: m for name, m in model.named_modules() if type(m) is layer_type}
    for layer in layers.values():
        layer.input_group = None
    for names in input_groups(model):
        members = [layers[n] for n in names if n in layers]
        if len(members) > 1:
            group = InputGroup(members)
            for m in members:
                m.input_group = group
