"""PARA, Prompt-Aware Representation Adjustment (Liu, Zhao, Tan, Zhu, Tian, EMNLP 2024 Industry).

Per decoder layer, a vector generator reads the layer's input hidden states, keeps the prompt
positions, and produces one vector per sequence:

    l = 1 + W_up act(pool(W_down h))        W_down: r x d, W_up: (sum of target widths) x r

whose slices scale, element-wise, the outputs of the targeted projections (q, v and the FFN up
projection by default). W_up starts at zero, so the adapted model starts at the backbone.

Order of the bottleneck: the paper (as summarized in DESIGN.md) leaves open whether pooling
comes before or after the down-projection. We down-project every prompt token and pool in the
bottleneck, as IAPT (same group) does: self-attention pooling then needs r parameters per layer,
not d, and the LLaMA-2 7B count (8,946,048 at r = 12) matches the paper's ~8.9M. For last and
mean pooling the two orders are the same function.

Runtime, with hooks (the module tree of the backbone is unchanged but for one `para_generator`
child per decoder layer, which holds the trainable tensors):
* a pre-hook on the whole model decides, per forward, whether it is a prefill (nothing in the
  KV cache yet: training, dev loss, the first step of `generate`, every step of a generation
  without cache) or a decode step (the cache holds earlier positions);
* at a prefill, a pre-hook on each decoder layer computes the vectors from the prompt mask
  given to `set_prompt_mask`, and from them each targeted projection's multiplier (one row per
  sequence), and keeps them;
* at a decode step the kept multipliers are reused: no generator runs, only the multiplies;
* a forward hook on each targeted projection multiplies its output by its multiplier.

A packed training batch (several examples per row, `set_prompt_mask(prompt_mask, segment_ids)`)
pools each example over its own prompt tokens (pooling.by_example) into one vector per example,
and each token's outputs are scaled by its own example's multiplier.

Generator tensors live in ParameterDicts keyed by adapter name, so several PARA adapters can sit
on one backbone: one active for every row, or one per row of a mixed-tenant batch
(`ParaAdapter.routing`: each row's vectors come from its own adapter's generator at prefill).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ...errors import ConfigError
from ..base import DEFAULT_ADAPTER, Adapter, Method, freeze
from ..common.layouts import hidden_size
from ..common.pooling import POOLINGS
from ..common.routing import RequestRows, check_tenants
from ..common.state import unique_parameters
from ..registry import register_method
from .config import ParaConfig
from .layer import ACTIVATIONS, GENERATOR, ParaGenerator, ParaRuntime, _runtime
from .plan import ROLES, plan_layers


class ParaAdapter(Adapter):
    method = "para"
    family = "para"

    def __init__(self, model: nn.Module, cfg: Any, name: str, runtime: ParaRuntime,
                 generators: dict[str, ParaGenerator], target_modules: list[str]):
        super().__init__(model, cfg, name)
        self.runtime = runtime
        self.generators = generators  # decoder layer path -> its generator
        self._target_modules = target_modules

    @property
    def parameter_kinds(self) -> tuple[str, ...]:  # the pooling queries exist for self-attention pooling only
        return ("down", "query", "up") if self.cfg.pooling == "self_attention" else ("down", "up")

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return unique_parameters(
            (f"{layer}.{GENERATOR}.{kind}", getattr(gen, kind)[self.name])
            for layer, gen in self.generators.items()
            for kind in ("down", "query", "up")
            if self.name in getattr(gen, kind)
        )

    def target_modules(self) -> list[str]:
        return self._target_modules

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None, segment_ids: torch.Tensor | None = None) -> None:
        """A packed batch (`segment_ids`): each example's vectors come from its own prompt and
        scale its own tokens only."""
        self.runtime.set_prompt_mask(prompt_mask, segment_ids)

    def vectors(self) -> dict[str, torch.Tensor | None]:
        """The vectors of the last prefill, per decoder layer (for inspection and tests)."""
        return {layer: gen.vectors for layer, gen in self.generators.items()}

    # -- several adapters: the runtime, not layers, knows which applies
    def activate(self) -> None:
        """Make this adapter the one every row uses (several may share the backbone)."""
        self.runtime.active = self.name

    def tenants(self) -> list[str]:
        return list(dict.fromkeys(n for g in self.runtime.generators for n in g.down))

    @contextlib.contextmanager
    def routing(self, names: list[str | None]) -> Iterator[None]:
        """Row i's vectors come from PARA adapter names[i]'s generator at prefill (None: the backbone)."""
        check_tenants(names, self.tenants())
        self.runtime.route = RequestRows(names)
        try:
            yield
        finally:
            self.runtime.route = None
            for generator in self.runtime.generators:
                generator.vectors = generator.scales = None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        saved = self.runtime.active, self.runtime.route
        self.runtime.active = self.runtime.route = None
        try:
            yield
        finally:
            self.runtime.active, self.runtime.route = saved

    def merge_refusal(self) -> str:
        return ("PARA cannot be merged (method 'para' does not support merging): its vectors are computed "
                "from each prompt, so no fixed weight change exists; serve the adapter unmerged (it costs three "
                "multiplies per layer per token)")


@register_method
class ParaMethod(Method):
    name = "para"
    config_class = ParaConfig
    adapter_class = ParaAdapter

    def check_config(self) -> None:
        c = self.cfg
        if c.bottleneck <= 0:
            raise ConfigError("method.bottleneck", f"must be a positive integer, got {c.bottleneck}")
        if c.pooling not in POOLINGS:
            raise ConfigError("method.pooling", f"choose one of {' | '.join(POOLINGS)}, got {c.pooling!r}")
        if c.activation not in ACTIVATIONS:
            raise ConfigError("method.activation", f"choose one of {' | '.join(ACTIVATIONS)}, got {c.activation!r}")
        targets = list(c.targets)
        if not targets:
            raise ConfigError("method.targets", "name at least one projection to scale, e.g. [q,v,up]")
        unknown = [t for t in targets if t not in ROLES]
        if unknown:
            raise ConfigError(
                "method.targets", f"unknown role(s) {', '.join(map(repr, unknown))}; choose among {', '.join(ROLES)}"
            )
        if len(set(targets)) != len(targets):
            raise ConfigError("method.targets", f"a role is named twice in {targets}")

    def check_model(self, model: nn.Module) -> None:
        self.check_config()
        plan_layers(model, list(self.cfg.targets))

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> ParaAdapter:
        self.check_config()
        plans = plan_layers(model, list(self.cfg.targets))
        hidden = hidden_size(model.config)  # the decoder layers' width (OPT may embed narrower)
        freeze(model)
        runtime = _runtime(model)
        generators: dict[str, ParaGenerator] = {}
        target_modules: list[str] = []
        for plan in plans:
            generator = getattr(plan.layer, GENERATOR, None)
            if generator is None:
                generator = ParaGenerator()
                plan.layer.add_module(GENERATOR, generator)
                runtime.generators.append(generator)
                plan.layer.register_forward_pre_hook(
                    lambda _m, args, kwargs, g=generator: runtime.before_layer(g, args, kwargs), with_kwargs=True
                )
            device = next(p for n, p in plan.layer.named_parameters() if not n.startswith(GENERATOR)).device
            generator.add_adapter(adapter_name, plan, hidden, self.cfg, device)
            for path in plan.segments:
                module = plan.layer.get_submodule(path)
                target_modules.append(f"{plan.path}.{path}")
                if id(module) not in runtime.hooked:
                    runtime.hooked.add(id(module))
                    module.register_forward_hook(
                        lambda _m, _args, out, g=generator, p=path: runtime.after_projection(g, p, out)
                    )
            generators[plan.path] = generator
        runtime.active = adapter_name
        return ParaAdapter(model, self.cfg, adapter_name, runtime, generators, sorted(target_modules))
