"""One rank product for the LoRA layers that read the same input. A decoder block's q, k and v
projections read one normalized hidden state, and so do a gated MLP's gate and up: their A's are
concatenated and x A_cat^T is computed once, each layer taking its rows (one pass over the
activations instead of three, and one gradient product back to them instead of three).

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
from ..common.wrapper import rank_product


def _version(x: torch.Tensor) -> int:
    return 0 if x.is_inference() else x._version  # inference tensors have no version counter


@dataclass
class _Product:
    x: torch.Tensor
    version: int
    name: str
    hT: torch.Tensor  # (sum of the members' ranks, tokens)
    rows: dict  # member -> (first row, rank, its B)
    pending: set = field(default_factory=set)  # members yet to take their rows


class InputGroup:
    """Sibling LoRA layers that read one input tensor; `product` gives each its rank product."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._cache: _Product | None = None

    def product(self, layer: nn.Module, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A x as (r, tokens), s B) of `layer`'s adapter `name` on its open ranks."""
        c = self._cache
        if c is not None and c.x is x and c.name == name and layer in c.pending and c.version == _version(x):
            c.pending.discard(layer)
            if not c.pending:
                self._cache = None  # every member took its rows: hold no activations
            start, r, B = c.rows[layer]
            return c.hT[start:start + r], B
        sharing = [m for m in self.members if m is layer or m.shares_input(name)]
        if len(sharing) == 1:
            A, B = layer.factors(name)
            return rank_product(A, x), B
        factors = {m: m.factors(name) for m in sharing}
        hT = rank_product(torch.cat([A for A, _ in factors.values()]), x)
        rows, start = {}, 0
        for m, (A, B) in factors.items():
            rows[m] = (start, A.shape[0], B)
            start += A.shape[0]
        self._cache = _Product(x, _version(x), name, hT, rows, set(sharing) - {layer})
        start, r, B = rows[layer]
        return hT[start:start + r], B


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
