"""The run's AdamW. torch's fused kernel where every parameter allows it: one kernel over all of
the adapter's tensors instead of a dozen small ops per tensor, which matters because adapters
are many small tensors (LoRA r=8 on SmolLM2-135M: 420 of them, whose step took 15 ms on one CPU
thread unfused and 4 ms fused). The update is AdamW's either way, equal to the unfused one
within float rounding."""

from __future__ import annotations

from typing import Any, Iterable

import torch

# Devices and dtypes torch's fused AdamW takes (torch >= 2.4 on CPUs).
FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fusable(params: Iterable[torch.Tensor], sharded: bool = False) -> bool:
    """Whether the fused kernel takes these parameters: plain floating tensors on one device it
    supports. Not under FSDP, whose sharded parameters the fused kernel is not made for."""
    devices = set()
    for p in params:
        if p.dtype not in FUSED_DTYPES or type(p) not in (torch.Tensor, torch.nn.Parameter):
            return False
        devices.add(p.device.type)
    return not sharded and len(devices) == 1 and devices <= set(FUSED_DEVICES)


def adamw(param_groups: list[dict[str, Any]] | Iterable[torch.Tensor], *, sharded: bool = False,
          **kwargs) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups` (dicts with "params", or the parameters themselves),
    fused where `fusable` allows; `kwargs` are AdamW's (lr, betas, eps, weight_decay)."""
    groups = list(param_groups)
    params = [p for g in groups for p in g["params"]] if groups and isinstance(groups[0], dict) else groups
    return torch.optim.AdamW(groups, fused=fusable(params, sharded) or None, **kwargs)
