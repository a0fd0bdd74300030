"""The wrapper layer of the LoRA family (LoRA, ALoRA, Tied-LoRA): a frozen linear-like layer
(nn.Linear, GPT-2's Conv1D, bitsandbytes 4/8-bit) with a low-rank update beside it, merged into
its weight on request. A method supplies the update (`add_update`, `add_per_request`,
`delta_weight`). Their export in PEFT's LoRA format is in peft_format.py.

The update of a rank-r adapter is added to the frozen output in one fused product-and-add
(`add_low_rank`), its rank product kept as (r, tokens): on CPUs the skinny products and their
gradients run several times faster in that orientation than as (tokens, r), and a separate
scale, product and sum would each pass over the whole output (and again in backward)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from ..base import AdapterLayer, replace_module
from .experts import expert_parameters, wrap_expert
from .targets import linear_features


class WrapperLayer(AdapterLayer):
    experts_layer: type | None = None  # the family's layer on a stacked expert parameter, if any

    def __init__(self, base_layer: nn.Module, features: tuple[int, int] | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features or linear_features(base_layer)

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def unwrap_in(self, model: nn.Module, name: str) -> None:
        """Put the wrapped layer back in place of this wrapper (at `name`)."""
        replace_module(model, name, self.base_layer)

    def add_update(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """`out` (the frozen layer's output for input `x`) plus adapter `name`'s update."""
        raise NotImplementedError

    def add_per_request(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` plus the update of a mixed-tenant batch: each row through its own adapter."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter `name`'s update as an (out, in) matrix."""
        raise NotImplementedError

    def mixed_batch(self) -> bool:
        """Whether the batch is routed to several adapters (or some rows to none)."""
        rows = self.route.rows if self.route is not None else None
        return rows is not None and bool(rows.tenants) and rows.single is None

    def plain_adapter(self) -> str | None:
        """The adapter every row of the batch goes through (None: none applies)."""
        name = self.active_adapter
        if self.route is not None:
            name = self.route.rows.single  # None with no tenant (every row on the backbone)
        if name is None or name in self.merged or name not in getattr(self, self.held):
            return None
        return name

    def update(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """Adapter `name`'s update for every token of `x` as a new (tokens, out) tensor in x's
        dtype, for `frozen_into`; None where the method only adds its update to an output."""
        return None

    def per_request_update(self, x: torch.Tensor) -> torch.Tensor | None:
        """The same for a mixed-tenant batch, (batch, tokens, out): each row's own adapter."""
        return None

    def update_first(self, x: torch.Tensor) -> bool:
        """Whether the frozen product may go into an update computed first (`frozen_into`):
        nothing for autograd to record, and a plain nn.Linear without bias in x's dtype."""
        base = self.base_layer
        return (not torch.is_grad_enabled() and type(base) is nn.Linear and base.bias is None
                and x.dtype == base.weight.dtype and not torch.is_autocast_enabled(x.device.type))

    def frozen_into(self, update: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`update` plus the frozen layer's output for `x`, shaped as x's tokens: the GEMM adds
        its product into the update as it writes (beta = 1), where adding an update afterwards
        passes over the whole output once more (a 128-token prefill of 8 rows: 5% with one LoRA
        adapter, 2% with 8 tenants)."""
        update = update.view(-1, self.out_features)
        update.addmm_(x.reshape(-1, self.in_features), self.base_layer.weight.t())
        return update.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.mixed_batch():
            update = self.per_request_update(x) if self.update_first(x) else None
            if update is not None:
                return self.frozen_into(update, x)
            return self.add_per_request(self.base_layer(x, *args, **kwargs), x)
        name = self.plain_adapter()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        update = self.update(x, name) if self.update_first(x) else None
        if update is not None:
            return self.frozen_into(update, x)
        if type(self.base_layer) is nn.Linear and x.dim() > 2:
            # On the input as a matrix the frozen output is a new matrix, not a view of one: the
            # update can go into it in place (`fresh_output`), sparing a copy of the output.
            out = self.add_update(self.base_layer(x.reshape(-1, x.shape[-1])), x, name)
            return out.view(*x.shape[:-1], out.shape[-1])
        return self.add_update(self.base_layer(x, *args, **kwargs), x, name)

    def fresh_output(self, out: torch.Tensor) -> bool:
        """Whether `out`, this layer's frozen output, may take the update in place even where
        autograd records it: an nn.Linear's output for a matrix input is a new matrix (not a
        view, so no CopySlices) that its backward does not keep."""
        return type(self.base_layer) is nn.Linear and out.dim() == 2 and out._base is None

    def _weight_and_delta(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.base_layer.weight
        if weight.__class__.__name__ in ("Params4bit", "Int8Params"):
            raise RuntimeError("merge needs an unquantized backbone: load it with model.quantization=null")
        delta = self.delta_weight(name)
        if isinstance(self.base_layer, Conv1D):  # Conv1D stores its weight as (in, out)
            delta = delta.T
        return weight, delta.to(weight.dtype)

    def merge(self, name: str) -> None:
        if name not in self.merged:
            weight, delta = self._weight_and_delta(name)
            weight.data += delta
            self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            weight, delta = self._weight_and_delta(name)
            weight.data -= delta
            self.merged.remove(name)


def add_low_rank(out: torch.Tensor, hT: torch.Tensor, Bt: torch.Tensor, fresh: bool = False) -> torch.Tensor:
    """out + hT^T Bt in one fused pass over `out` (..., n): hT (r, tokens) the rank product,
    Bt (r, n) the scaled up-projection, transposed and contiguous (its gradient is then the
    fast (r, tokens) x (tokens, n) product). In place where autograd records nothing
    (generation) or `out` is `fresh` (WrapperLayer.fresh_output); out of place, the sum is a new
    tensor and `out` is copied into it first. An output of another dtype than the product's (a
    bf16 backbone with fp32 adapters) gets the update computed in the product's dtype, then cast."""
    out2d = out if out.dim() == 2 else out.reshape(-1, out.shape[-1])
    if out.dtype == hT.dtype or torch.is_autocast_enabled(out.device.type):
        recorded = out.requires_grad or hT.requires_grad or Bt.requires_grad
        in_place = (fresh or not recorded) and out.dtype == hT.dtype == Bt.dtype
        add = torch.Tensor.addmm_ if in_place else torch.addmm
        return add(out2d, hT.t(), Bt).view(out.shape)
    return (out2d + (hT.t() @ Bt).to(out.dtype)).view(out.shape)


def rank_product(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A x for every token of `x` (..., in) as (r, tokens), in A's dtype."""
    return A @ x.reshape(-1, x.shape[-1]).to(A.dtype).t()


def wrap_targets(model: nn.Module, names: list[str], layer_type: type[WrapperLayer], method: str
                 ) -> dict[str, WrapperLayer]:
    """The `layer_type` wrapper of every module in `names`, wrapping those not wrapped yet; a
    stacked expert parameter among them gets the family's experts layer (`layer_type.experts_layer`,
    common/experts.py). Refuses a module another method's wrapper holds (one wrapper cannot hold
    the other's adapters): call before changing anything."""
    experts = expert_parameters(model)
    for name in names:
        module = model.get_submodule(experts[name][0] if name in experts else name)
        foreign = module
        while hasattr(foreign, "base_layer") and isinstance(foreign, AdapterLayer):
            if not isinstance(foreign, layer_type):
                raise ConfigError("method.name", f"{name} already holds a {type(foreign).__name__} adapter, which "
                                                 f"{method} cannot share; attach {method} to a backbone of its own")
            foreign = foreign.base_layer
        if name in experts and getattr(layer_type, "experts_layer", None) is None:
            raise ConfigError("method.targets", f"{name} is a stacked expert weight, which {method} does not adapt; "
                                                "name linear modules only")
    layers = {}
    for name in names:
        if name in experts:
            path, param = experts[name]
            layers[name] = wrap_expert(model, name, path, param, layer_type.experts_layer)
            continue
        module = model.get_submodule(name)
        if not isinstance(module, layer_type):
            module = layer_type(module)
            replace_module(model, name, module)
        layers[name] = module
    return layers
