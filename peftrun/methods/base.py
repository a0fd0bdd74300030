"""The method contract, with defaults: what the training loop, the generator, the router and the
exporter may ask of a method and of the adapter it attaches. Shared behaviour lives here once (as
in Hugging Face PEFT's BaseTuner / BaseTunerLayer); a method overrides only what differs.

* `Method`: built from its config dataclass; checks the config (`check_config`), the backbone
  (`check_model`, on a meta-device model too) and the run's length (`check_run`), all before any
  weights load; `attach(model)` freezes the backbone, injects, and returns an `Adapter`.
* `Adapter`: owns every trainable tensor; saves and loads them by name; may add training
  callbacks, learn which tokens are the prompt, serve mixed-tenant batches, merge, unload and
  export to PEFT's format.
* `AdapterLayer`: a module a method puts on the backbone, holding every adapter of that method
  keyed by adapter name (several adapters can share one backbone).

A method joins the registry with `@register_method` (registry.py); see docs/adding-a-method.md.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import torch
from torch import nn

from .common.routing import RequestRows, Route, check_tenants, check_unmerged
from .common.state import config_to_dict, load_named, snapshot

DEFAULT_ADAPTER = "default"


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


class AdapterLayer(nn.Module):
    """A module a method puts on the backbone. Its per-adapter state is a dict keyed by adapter
    name, the attribute named by `held`; `active_adapter` is the one applied to every row,
    `route` a mixed-tenant batch (one adapter per row), `merged` the adapters folded into the
    weights (linear methods)."""

    held: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.active_adapter: str | None = None
        self.route: Route | None = None
        self.merged: list[str] = []

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.held))

    def start_route(self, route: Route) -> None:
        self.route = route

    def end_route(self) -> None:
        """Drop the route and whatever was computed for its batch."""
        self.route = None


class Adapter:
    """The adapter `Method.attach` returns. Subclasses set the class attributes and implement
    `trainable_parameters`; every other member has a default that fits most methods."""

    method: ClassVar[str]  # registry name, e.g. "lora"
    # Adapters of one family share their layers (LoRA and ALoRA both use LoraLinear): one
    # router per family serves all of them.
    family: ClassVar[str]
    layer_type: ClassVar[type[AdapterLayer] | None] = None
    # Wraps the backbone's projections: another wrapping family cannot share the backbone.
    wraps_projections: ClassVar[bool] = False
    supports_merge: ClassVar[bool] = False  # linear: the update folds into the weights
    # Kinds of trainable tensors, in the order `parameter_counts` reports them.
    parameter_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, cfg: Any, name: str, layers: Mapping[str, nn.Module] | None = None):
        self.model = model
        self.cfg = cfg
        self.name = name
        self.layers: dict[str, nn.Module] = dict(layers or {})  # full module name -> its layer

    # ------------------------------------------------------------------ tensors and state
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Unique trainable parameters (a tensor tied across layers appears once)."""
        raise NotImplementedError

    def saved_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor a checkpoint or a saved adapter holds, by name (frozen ones a method
        cannot re-draw included)."""
        return self.trainable_parameters()

    def kind_of(self, name: str) -> str:
        """The kind of the trainable tensor `name` (for counts and parameter groups)."""
        return name.rsplit(".", 1)[-1]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameter count by kind, plus "total"."""
        counts = dict.fromkeys(self.parameter_kinds, 0)
        for name, p in self.trainable_parameters():
            kind = self.kind_of(name)
            counts[kind] = counts.get(kind, 0) + p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups covering exactly trainable_parameters(), each {"params", "lr"};
        `lr` is trainer.lr and the schedule scales every group alike."""
        return [{"params": [p for _, p in self.trainable_parameters()], "lr": lr}]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Contiguous copies, no shared storage (safetensors refuses it); gathered under FSDP."""
        return snapshot(self.saved_tensors())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_named(dict(self.saved_tensors()), state)

    def target_modules(self) -> list[str]:
        return sorted(self.layers)

    def config_dict(self) -> dict[str, Any]:
        """The method config, as written next to the saved tensors."""
        return {**config_to_dict(self.cfg), "target_modules": self.target_modules()}

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond tensors (kept in checkpoints), JSON-serializable."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ training
    def callbacks(self) -> list[Any]:
        """Training callbacks the method needs (peftrun.train.callbacks.Callback hooks)."""
        return []

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None, segment_ids: torch.Tensor | None = None) -> None:
        """Prompt-aware methods learn here which tokens of the next forward are the prompt.

        `segment_ids` (rows, seq) describes a packed batch (data.collate_packed): each token's
        example, numbered over the whole batch from 0, -1 on padding. None: one example per row.
        A prompt-aware method conditions each example on its own prompt only (pooling.by_example)."""

    # ------------------------------------------------------------------ several adapters on one backbone
    def shared_layers(self) -> list[AdapterLayer]:
        """Every layer of this method's type on the backbone, whichever adapter put it there."""
        if self.layer_type is None:
            return []
        return [m for m in self.model.modules() if isinstance(m, self.layer_type)]

    def tenants(self) -> list[str]:
        """Names of every adapter of this family on the backbone, first seen first."""
        return held_adapters(self.shared_layers())

    def activate(self) -> None:
        """Make this adapter the only one the model applies (layers it does not adapt apply none)."""
        for layer in self.shared_layers():
            layer.active_adapter = self.name if self.name in layer.adapter_names() else None

    def make_route(self, rows: RequestRows) -> Route:
        """What the layers share for one mixed-tenant batch (a method may cache more in it)."""
        return Route(rows)

    @contextlib.contextmanager
    def routing(self, names: list[str | None]) -> Iterator[None]:
        """Within the context, batch row i goes through adapter names[i] of this family (None:
        the backbone) on every layer of the backbone: one batch, many tenants. Inference only."""
        layers = self.shared_layers()  # one walk of the model per batch
        check_tenants(names, held_adapters(layers))
        check_unmerged(layers)
        route = self.make_route(RequestRows(names))
        for layer in layers:
            layer.start_route(route)
        try:
            yield
        finally:
            for layer in layers:
                layer.end_route()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the context the model computes exactly the backbone: no layer applies an
        adapter, and this adapter, if merged, is taken out of the weights meanwhile."""
        layers = self.shared_layers()
        merged = [layer for layer in layers if self.name in layer.merged]
        for layer in merged:
            layer.unmerge(self.name)
        saved = [(layer.active_adapter, layer.route) for layer in layers]
        for layer in layers:
            layer.active_adapter, layer.route = None, None
        try:
            yield
        finally:
            for layer, (active, route) in zip(layers, saved):
                layer.active_adapter, layer.route = active, route
            for layer in merged:
                layer.merge(self.name)

    # ------------------------------------------------------------------ merge, unload, export
    def merge_refusal(self) -> str:
        return f"method {self.method!r} does not support merging"

    def merge(self) -> None:
        """Fold the adapter into the backbone weights (linear methods only)."""
        if not self.supports_merge:
            raise ValueError(self.merge_refusal())
        for layer in self.layers.values():
            layer.merge(self.name)

    def unmerge(self) -> None:
        for layer in self.layers.values():
            if self.name in layer.merged:
                layer.unmerge(self.name)

    def unload(self, model: nn.Module) -> nn.Module:
        """Merge into the backbone weights and put the wrapped layers back, so the model saves as
        a plain transformers checkpoint; returns `model`. The adapter is unusable afterwards."""
        if not self.supports_merge:
            raise ValueError(self.merge_refusal())
        own = {id(layer) for layer in self.layers.values()}
        for name, layer in model.named_modules():
            if not isinstance(layer, self.layer_type):
                continue
            if id(layer) not in own:
                raise ValueError(f"{name} holds a {type(layer).__name__} that is not this adapter's; cannot strip it")
            others = sorted(set(layer.adapter_names()) - {self.name})
            if others:
                raise ValueError(f"{name} also holds adapter(s) {others}; stripping the wrapper would drop them")
        self.merge()  # raises (before changing anything) on a quantized backbone
        for name, layer in self.layers.items():
            layer.unwrap_in(model, name)
        self.layers.clear()
        return model

    def peft_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The adapter in Hugging Face PEFT's format (see peftrun.export): the PEFT config
        fields, `peft_type` included, and the tensors keyed `base_model.model.<module>.<tensor>`."""
        raise ValueError(
            f"method {self.method!r} has no Hugging Face PEFT export yet; "
            "save it with peftrun's own format (save_adapter) or merge it (merge_into_backbone)"
        )


class Method:
    """A method built from its config dataclass. Every check raises ConfigError (one line, the
    config key and the fix) before the model is touched."""

    name: ClassVar[str]
    config_class: ClassVar[type]  # the dataclass schema of `method.*` (registered for Hydra)
    adapter_class: ClassVar[type[Adapter]]
    # Set where FSDP cannot shard the method: the reason, said when trainer.strategy=fsdp.
    fsdp_unsupported: ClassVar[str | None] = None
    # Several methods on one backbone attach in this order (IAPT's generators hold linear
    # layers that an "all-linear" LoRA attached after them would wrap: IAPT comes last).
    attach_order: ClassVar[int] = 0

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def check_config(self) -> None:
        """Checks that need no model."""

    def check_model(self, model: nn.Module) -> None:
        """Checks against the architecture (works on a meta-device model)."""

    def check_run(self, total_steps: int, steps_per_epoch: int) -> None:
        """Checks that need the run's length, known before any weights load."""

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> Adapter:
        """Validate, freeze the backbone, inject; the adapter owns every trainable tensor."""
        raise NotImplementedError


def held_adapters(layers: Iterable[AdapterLayer]) -> list[str]:
    """Names of the adapters `layers` hold, first seen first."""
    return list(dict.fromkeys(n for layer in layers for n in layer.adapter_names()))
