"""Small helpers shared by methods."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf


def config_to_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def snapshot(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Detached contiguous copies of (name, tensor) pairs: what a saved adapter holds."""
    return {name: p.detach().clone().contiguous() for name, p in named}


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
            own[key].copy_(tensor)
