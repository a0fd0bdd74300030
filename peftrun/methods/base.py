"""The method contract: what the training loop, the generator and the exporter may ask of an
adapter. A method is a class built from its config dataclass; `attach(model)` validates, then
freezes the backbone and injects, and returns an `Adapter` that owns every trainable tensor."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Adapter(Protocol):
    method: str  # registry name, e.g. "lora"
    supports_merge: bool

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Unique trainable parameters (a tensor tied across layers appears once)."""

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameter count by kind, plus "total"."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint or an export stores: contiguous tensors, no shared storage."""

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def config_dict(self) -> dict[str, Any]:
        """The method config, as written next to the saved tensors."""

    def callbacks(self) -> list[Any]:
        """Training callbacks the method needs (see peftrun.train.callbacks.Callback)."""

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None) -> None:
        """Prompt-aware methods learn here which tokens of the next forward are the prompt."""

    def disabled(self) -> contextlib.AbstractContextManager:
        """Within the context the model computes exactly the backbone."""

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond tensors (kept in checkpoints), JSON-serializable."""

    def load_extra_state(self, state: Mapping[str, Any]) -> None: ...

    # Optional (the loop checks with hasattr; methods without it train every tensor at the
    # trainer's lr):
    #     def param_groups(self, lr: float) -> list[dict[str, Any]]
    # Optimizer parameter groups covering exactly trainable_parameters(), each {"params": [...],
    # "lr": ...}; `lr` is trainer.lr. The schedule scales every group alike. IAPT uses it to
    # train its rational-activation coefficients at their own learning rate.


class Method(Protocol):
    name: str

    def check_config(self) -> None:
        """Checks that need no model; raise ConfigError."""

    def check_model(self, model: nn.Module) -> None:
        """Checks against the architecture (works on a meta-device model); raise ConfigError."""

    def attach(self, model: nn.Module) -> Adapter: ...


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unique_parameters(named: Iterator[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out
