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

Generator tensors live in ParameterDicts keyed by adapter name, so several PARA adapters can sit
on one backbone: one active for every row, or one per row of a mixed-tenant batch
(`ParaAdapter.routing`: each row's vectors come from its own adapter's generator at prefill).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import freeze, unique_parameters
from .common import RequestRows, check_tenants, config_to_dict, load_named, snapshot
from .pooling import POOLINGS, check_mask, pool
from .targets import linear_features

DEFAULT = "default"
GENERATOR = "para_generator"  # the child module added to every decoder layer
RUNTIME = "_peftrun_para"  # attribute of the backbone holding the shared runtime state

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}

# Role -> (module path inside a decoder layer, (part, parts) of its output or None for all of it).
LAYOUTS: dict[str, dict[str, tuple[str, tuple[int, int] | None]]] = {
    "llama": {  # also Mistral, Qwen2, Gemma...: separate projections
        "q": ("self_attn.q_proj", None),
        "k": ("self_attn.k_proj", None),
        "v": ("self_attn.v_proj", None),
        "o": ("self_attn.o_proj", None),
        "gate": ("mlp.gate_proj", None),
        "up": ("mlp.up_proj", None),
        "down": ("mlp.down_proj", None),
    },
    "gpt2": {  # fused c_attn: q | k | v, each n_embd wide
        "q": ("attn.c_attn", (0, 3)),
        "k": ("attn.c_attn", (1, 3)),
        "v": ("attn.c_attn", (2, 3)),
        "o": ("attn.c_proj", None),
        "up": ("mlp.c_fc", None),
        "down": ("mlp.c_proj", None),
    },
}
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


# ------------------------------------------------------------------------------- where it goes
@dataclass
class Segment:
    """Output columns [start, end) of one module are scaled by vector entries from `offset`."""

    start: int
    end: int
    offset: int


@dataclass
class LayerPlan:
    path: str  # the decoder layer's full name
    layer: nn.Module
    segments: dict[str, list[Segment]] = field(default_factory=dict)  # module path in the layer
    out_features: dict[str, int] = field(default_factory=dict)
    width: int = 0  # length of the generated vector


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def decoder_layers(model: nn.Module) -> tuple[str, str, nn.ModuleList]:
    """(layout name, full name, the ModuleList) of the model's decoder layers."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (n is None or len(module) == n):
            for layout, roles in LAYOUTS.items():
                if _has(module[0], roles["q"][0]):
                    return layout, name, module
    raise ConfigError(
        "method.name",
        "PARA knows Llama-style (q_proj, v_proj, up_proj) and GPT-2 (c_attn, c_fc) decoder layers "
        "and found neither in this model; pick another method",
    )


def plan_layers(model: nn.Module, targets: list[str]) -> list[LayerPlan]:
    """Which output columns of which modules each layer's vector scales; raises ConfigError."""
    layout, prefix, layers = decoder_layers(model)
    roles = LAYOUTS[layout]
    missing = [t for t in targets if t not in roles]
    if missing:
        raise ConfigError(
            "method.targets", f"{layout}-style layers have no {', '.join(missing)} projection; "
            f"choose among {', '.join(roles)}",
        )
    plans = []
    for i, layer in enumerate(layers):
        plan = LayerPlan(path=f"{prefix}.{i}", layer=layer)
        for role in targets:
            path, part = roles[role]
            if not _has(layer, path):
                raise ConfigError("method.targets", f"layer {plan.path} has no {path} for target {role!r}")
            out = linear_features(layer.get_submodule(path))[1]
            start, end = 0, out
            if part is not None:
                index, parts = part
                start, end = index * out // parts, (index + 1) * out // parts
            plan.out_features[path] = out
            plan.segments.setdefault(path, []).append(Segment(start, end, plan.width))
            plan.width += end - start
        for segs in plan.segments.values():
            segs.sort(key=lambda s: s.start)
        plans.append(plan)
    return plans


# ---------------------------------------------------------------------------------- generator
class ParaGenerator(nn.Module):
    """The vector generator of one decoder layer, for every PARA adapter on the backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.ParameterDict()  # name -> (r, d)
        self.query = nn.ParameterDict()  # name -> (r,), self-attention pooling only
        self.up = nn.ParameterDict()  # name -> (width, r)
        self.pooling: dict[str, str] = {}
        self.activation: dict[str, str] = {}
        self.segments: dict[str, dict[str, list[Segment]]] = {}
        self.out_features: dict[str, int] = {}
        self.vectors: torch.Tensor | None = None  # (batch, width) of the current prompts (one adapter)
        # Module path -> (batch, out_features) multiplier of its output for the current prompts.
        self.scales: dict[str, torch.Tensor] | None = None

    def add_adapter(self, name: str, plan: LayerPlan, hidden_size: int, cfg: Any, device) -> None:
        if name in self.down:
            raise ValueError(f"a PARA adapter named {name!r} is already attached to {plan.path}")
        r = cfg.bottleneck
        down = torch.empty(r, hidden_size, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.down[name] = nn.Parameter(down)
        if cfg.pooling == "self_attention":
            # Zero queries pool by the mean at first; training sharpens them.
            self.query[name] = nn.Parameter(torch.zeros(r, device=device, dtype=torch.float32))
        # Zero: every vector is exactly 1 at step 0, the model is the backbone.
        self.up[name] = nn.Parameter(torch.zeros(plan.width, r, device=device, dtype=torch.float32))
        self.pooling[name] = cfg.pooling
        self.activation[name] = cfg.activation
        self.segments[name] = plan.segments
        self.out_features.update(plan.out_features)

    def forward(self, name: str, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d) hidden states and (batch, seq) prompt mask -> (batch, width) vectors."""
        down = self.down[name]
        z = F.linear(hidden.to(down.dtype), down)
        pooled = pool(z, prompt_mask, self.pooling[name], self.query[name] if name in self.query else None)
        return 1.0 + F.linear(ACTIVATIONS[self.activation[name]](pooled), self.up[name])

    def multipliers(self, name: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adapter `name`'s (batch, width) vectors as a (batch, out_features) multiplier per
        module it scales. Unscaled columns (GPT-2's k slice) get ones."""
        out = {}
        batch = vectors.shape[0]
        for path, segments in self.segments.get(name, {}).items():
            pieces, pos = [], 0
            for s in segments:
                if s.start > pos:
                    pieces.append(vectors.new_ones(batch, s.start - pos))
                pieces.append(vectors[:, s.offset : s.offset + s.end - s.start])
                pos = s.end
            if pos < self.out_features[path]:
                pieces.append(vectors.new_ones(batch, self.out_features[path] - pos))
            out[path] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return out

    def prefill(self, name: str, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """One adapter for every row: compute and keep the vectors and multipliers."""
        self.vectors = self(name, hidden, prompt_mask)
        self.scales = self.multipliers(name, self.vectors)

    def prefill_per_request(self, rows: RequestRows, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Row i through adapter rows.names[i]: each tenant's generator reads only its rows; the
        backbone's rows (and rows of adapters this layer does not hold) get multipliers of 1."""
        self.vectors = None  # the widths may differ between tenants
        scales: dict[str, torch.Tensor] = {}
        for name in rows.tenants:
            if name not in self.down:
                continue
            index = rows.rows(name, hidden.device)
            vectors = self(name, hidden.index_select(0, index), prompt_mask.index_select(0, index))
            for path, m in self.multipliers(name, vectors).items():
                if path not in scales:
                    scales[path] = m.new_ones(hidden.shape[0], self.out_features[path])
                scales[path] = scales[path].index_copy(0, index, m)
        self.scales = scales


# ------------------------------------------------------------------------------------ runtime
class ParaRuntime:
    """State shared by the hooks of one backbone: the active adapter, the prompt mask, and
    whether the current forward is a prefill or a decode step."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.route: RequestRows | None = None  # a mixed-tenant batch: one adapter per row
        self.prompt_mask: torch.Tensor | None = None  # as given to set_prompt_mask
        self.forward_mask: torch.Tensor | None = None  # fitted to the current forward's batch
        self.prefill = False
        self.generators: list[ParaGenerator] = []
        self.hooked: set[int] = set()  # ids of modules that already carry our hooks

    def set_prompt_mask(self, mask: torch.Tensor | None) -> None:
        self.prompt_mask = mask
        self.forward_mask = None
        for generator in self.generators:  # vectors belong to the previous prompts
            generator.vectors = generator.scales = None

    def applies(self) -> bool:
        """Whether this forward uses any PARA adapter."""
        return bool(self.route.tenants) if self.route is not None else self.active is not None

    # -- hooks
    def before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.applies():
            return
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.prefill = past == 0
        if not self.prefill:
            return  # a decode step: the layers reuse the vectors of the prefill
        mask = self.prompt_mask
        if mask is None:
            raise RuntimeError(
                "PARA needs to know the prompt: call adapter.set_prompt_mask(prompt_mask) before the forward"
            )
        batch, seq = inputs.shape[0], inputs.shape[1]
        if self.route is not None:
            self.route.check_batch(batch)
        if seq < mask.shape[1]:
            raise RuntimeError(
                f"the prompt mask is {mask.shape[1]} tokens wide but the input only {seq}; "
                "set the mask of this batch"
            )
        if batch != mask.shape[0]:
            if batch % mask.shape[0]:
                raise RuntimeError(
                    f"the prompt mask has {mask.shape[0]} rows but the input {batch}; set the mask of this batch"
                )
            # Beam search / num_return_sequences repeat each prompt in place (repeat_interleave).
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        if seq > mask.shape[1]:
            # Generation without a KV cache re-reads the prompt followed by what was generated.
            mask = F.pad(mask, (0, seq - mask.shape[1]))
        mask = mask.to(inputs.device)
        check_mask(mask)
        self.forward_mask = mask

    def before_layer(self, generator: ParaGenerator, args: tuple, kwargs: dict) -> None:
        if not self.applies():
            return
        name = self.active if self.route is None else self.route.single
        if self.prefill:
            hidden = args[0] if args else kwargs["hidden_states"]
            if name is None:
                generator.prefill_per_request(self.route, hidden, self.forward_mask)
            elif name in generator.down:
                generator.prefill(name, hidden, self.forward_mask)
            else:
                generator.vectors, generator.scales = None, {}
        elif generator.scales is None:
            raise RuntimeError(
                "PARA got a decode step with no vectors from a prefill; call adapter.set_prompt_mask "
                "and run the prompt first"
            )

    def after_projection(self, generator: ParaGenerator, path: str, output: torch.Tensor) -> torch.Tensor:
        if not self.applies():
            return output
        scale = generator.scales.get(path) if generator.scales is not None else None
        if scale is None:
            return output
        if scale.shape[0] != output.shape[0]:
            raise RuntimeError(
                f"PARA vectors were computed for {scale.shape[0]} sequences, this forward has {output.shape[0]}; "
                "call adapter.set_prompt_mask with the new batch's prompt mask"
            )
        shape = (output.shape[0],) + (1,) * (output.dim() - 2) + (output.shape[-1],)
        return output * scale.view(shape).to(output.dtype)


def _runtime(model: nn.Module) -> ParaRuntime:
    runtime = model.__dict__.get(RUNTIME)
    if runtime is None:
        runtime = ParaRuntime()
        model.__dict__[RUNTIME] = runtime  # a plain attribute: not a module, not in state_dict
        model.register_forward_pre_hook(runtime.before_model, with_kwargs=True)
    return runtime


# ------------------------------------------------------------------------------------ adapter
class ParaAdapter:
    method = "para"
    supports_merge = False  # the vectors depend on each prompt: nothing fixed to fold into W

    def __init__(self, model: nn.Module, runtime: ParaRuntime, generators: dict[str, ParaGenerator],
                 target_modules: list[str], cfg: Any, name: str):
        self.model = model
        self.runtime = runtime
        self.generators = generators  # decoder layer path -> its generator
        self.target_modules = target_modules
        self.cfg = cfg
        self.name = name

    # -- parameters and state
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named = (
            (f"{layer}.{GENERATOR}.{kind}", getattr(gen, kind)[self.name])
            for layer, gen in self.generators.items()
            for kind in ("down", "query", "up")
            if self.name in getattr(gen, kind)
        )
        return unique_parameters(named)

    def parameter_counts(self) -> dict[str, int]:
        counts = {"down": 0, "query": 0, "up": 0}
        for name, p in self.trainable_parameters():
            counts[name.rsplit(".", 1)[-1]] += p.numel()
        if self.cfg.pooling != "self_attention":
            del counts["query"]
        counts["total"] = sum(counts.values())
        return counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        return snapshot(self.trainable_parameters())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_named(dict(self.trainable_parameters()), state)

    def config_dict(self) -> dict[str, Any]:
        return {**config_to_dict(self.cfg), "target_modules": self.target_modules}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def callbacks(self) -> list[Any]:
        return []

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None) -> None:
        self.runtime.set_prompt_mask(prompt_mask)

    def vectors(self) -> dict[str, torch.Tensor | None]:
        """The vectors of the last prefill, per decoder layer (for inspection and tests)."""
        return {layer: gen.vectors for layer, gen in self.generators.items()}

    # -- switching
    def activate(self) -> None:
        """Make this adapter the one every row uses (several may share the backbone)."""
        self.runtime.active = self.name

    def tenants(self) -> list[str]:
        """Names of every PARA adapter on the backbone."""
        return list(dict.fromkeys(n for g in self.runtime.generators for n in g.down))

    @contextlib.contextmanager
    def routing(self, names: list[str | None]):
        """Within the context, batch row i goes through PARA adapter names[i] (None: the
        backbone): its vectors come from that adapter's generator at prefill."""
        check_tenants(names, self.tenants())
        self.runtime.route = RequestRows(names)
        try:
            yield
        finally:
            self.runtime.route = None
            for generator in self.runtime.generators:
                generator.vectors = generator.scales = None

    @contextlib.contextmanager
    def disabled(self):
        saved = self.runtime.active, self.runtime.route
        self.runtime.active = self.runtime.route = None
        try:
            yield
        finally:
            self.runtime.active, self.runtime.route = saved

    def merge(self) -> None:
        raise ValueError(
            "PARA cannot be merged: its vectors are computed from each prompt, so no fixed weight "
            "change exists; serve the adapter unmerged (it costs three multiplies per layer per token)"
        )

    def unmerge(self) -> None:
        self.merge()


class ParaMethod:
    name = "para"

    def __init__(self, cfg: Any):
        self.cfg = cfg

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

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT) -> ParaAdapter:
        self.check_config()
        plans = plan_layers(model, list(self.cfg.targets))
        hidden_size = model.get_input_embeddings().embedding_dim
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
            generator.add_adapter(adapter_name, plan, hidden_size, self.cfg, device)
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
        return ParaAdapter(model, runtime, generators, sorted(target_modules), self.cfg, adapter_name)
