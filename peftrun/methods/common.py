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
    """The backbone exactly, for the duration: every layer's active adapter set to None, and an
    adapter merged into a layer's weights (layers that track `merged`) taken out meanwhile."""
    layers = list(layers)
    merged = [layer for layer in layers if name in getattr(layer, "merged", ())]
    for layer in merged:
        layer.unmerge(name)
    saved = [layer.active_adapter for layer in layers]
    for layer in layers:
        layer.active_adapter = None
    try:
        yield
    finally:
        for layer, active in zip(layers, saved):
            layer.active_adapter = active
        for layer in merged:
            layer.merge(name)
