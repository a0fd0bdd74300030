"""An adapter's tensors as a saved adapter holds them: contiguous copies, gathered when sharded."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

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


def unique_parameters(named: Iterable[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs with each parameter once (a tensor tied across layers)."""
    seen: set[int] = set()
    out = []
    for name, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out
