"""Small helpers shared by methods."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor, distribute_tensor


def config_to_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a sharded one (FSDP's DTensor: gathered from every process, so every
    process must ask together); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def snapshot(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Detached contiguous copies of (name, tensor) pairs: what a saved adapter holds.
    Sharded tensors are gathered: under FSDP every process calls this together."""
    return {name: whole(p.detach()).clone().contiguous() for name, p in named}


def load_named(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the tensors `own` (same names, same shapes), refusing any mismatch."""
    if set(state) != set(own):
        missing = sorted(set(own) - set(state))[:3]
        unexpected = sorted(set(state) - set(own))[:3]
        raise ValueError(f"adapter tensors do not match: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key, tensor in state.items():
            if own[key].shape != tensor.shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} != {tuple(own[key].shape)}")
            if isinstance(own[key], DTensor):  # keep this process's shard of the full tensor
                tensor = distribute_tensor(tensor.to(own[key].device, own[key].dtype), own[key].device_mesh,
                                           own[key].placements, src_data_rank=None)
            own[key].copy_(tensor)


@contextlib.contextmanager
def layers_disabled(layers: Iterable[Any], name: str) -> Iterator[None]:
    """The backbone exactly, for the duration: every layer's active adapter (and mixed-tenant
    routing, on layers that have one) set to None, and an adapter merged into a layer's weights
    (layers that track `merged`) taken out meanwhile."""
    layers = list(layers)
    merged = [layer for layer in layers if name in getattr(layer, "merged", ())]
    for layer in merged:
        layer.unmerge(name)
    saved = [(layer.active_adapter, getattr(layer, "route", None)) for layer in layers]
    for layer in layers:
        layer.active_adapter = None
        if hasattr(layer, "route"):
            layer.route = None
    try:
        yield
    finally:
        for layer, (active, route) in zip(layers, saved):
            layer.active_adapter = active
            if hasattr(layer, "route"):
                layer.route = route
        for layer in merged:
            layer.merge(name)


class RequestRows:
    """The adapter of each batch row in a mixed-tenant batch (None: the backbone alone).

    `tenants` are the distinct names in first-seen order; row i uses slot `slot[i]`: 0 for the
    backbone, 1 + the tenant's index otherwise, so per-tenant tensors stacked behind a zero slot
    can be gathered per row with one index. Beams of a request repeat its name, row by row."""

    def __init__(self, names: Iterable[str | None]):
        self.names = list(names)
        self.tenants = list(dict.fromkeys(n for n in self.names if n is not None))
        self.slot = torch.tensor([0 if n is None else 1 + self.tenants.index(n) for n in self.names])
        # One adapter for every row: the plain single-adapter path is exact and fastest.
        self.single = self.tenants[0] if len(self.tenants) == 1 and None not in self.names else None
        self._rows: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def check_batch(self, batch: int) -> None:
        if batch != len(self.names):
            raise ValueError(f"{len(self.names)} request adapters for a batch of {batch} rows; "
                             "route each batch with its own names (one per row, beams included)")

    def rows(self, name: str, device: torch.device) -> torch.Tensor:
        """Indices of the rows that use `name`, on `device` (cached)."""
        key = (name, device)
        if key not in self._rows:
            self._rows[key] = torch.tensor([i for i, n in enumerate(self.names) if n == name], device=device)
        return self._rows[key]


def adapter_layers(model: Any, layer_type: type) -> list[Any]:
    """Every layer of `layer_type` on the backbone, whichever adapter of the method put it there."""
    return [m for m in model.modules() if isinstance(m, layer_type)]


def activate_only(layers: Iterable[Any], name: str, held: str) -> None:
    """Make adapter `name` the only one these layers apply; a layer that does not hold it (in
    its `held` dict) applies none."""
    for layer in layers:
        layer.active_adapter = name if name in getattr(layer, held) else None


def layer_tenants(layers: Iterable[Any], held: str) -> list[str]:
    """Names of every adapter the layers hold (in their `held` dicts), first seen first."""
    return list(dict.fromkeys(n for layer in layers for n in getattr(layer, held)))


def check_unmerged(layers: Iterable[Any]) -> None:
    """Refuse routing while an adapter is merged into the weights: every row would get it."""
    merged = sorted({n for layer in layers for n in layer.merged})
    if merged:
        raise ValueError(f"adapter(s) {merged} are merged into the backbone weights, so every row "
                         "would get them; unmerge them before routing requests")


def check_tenants(names: Iterable[str | None], known: Iterable[str]) -> None:
    """Refuse a request naming an adapter this backbone does not hold."""
    known = list(known)
    for name in names:
        if name is not None and name not in known:
            raise ValueError(f"no adapter named {name!r} on this model (have: {', '.join(known) or 'none'})")


def check_unwrapped(model: Any, names: Iterable[str], own: type, method: str) -> None:
    """Refuse target modules that another method's adapter already wraps (LoRA and Tied-LoRA
    both wrap the projections they adapt; one wrapper cannot hold the other's adapters)."""
    from ..errors import ConfigError

    for name in names:
        module = model.get_submodule(name)
        if hasattr(module, "base_layer") and not isinstance(module, own):
            raise ConfigError("method.name", f"{name} already holds a {type(module).__name__} adapter, which "
                                             f"{method} cannot share; attach {method} to a backbone of its own")
