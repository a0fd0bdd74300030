"""Tied-LoRA (Renduchintala, Konuk, Kuchaiev, NAACL 2024): one A (r x d) and one B (out x r)
shared by every layer, scaled per layer by vectors u_i (r) and v_i (out):

    h_i = W_i x + v_i * (B (u_i * (A x)))        (alpha = r: no extra scale)

The default target "qkv" adapts the attention's q|k|v output as one fused projection (GQA-aware:
out = q + k + v sizes): the update is computed once per layer and its slices are added to
q_proj / k_proj / v_proj, or to GPT-2's fused c_attn directly. Other module names (o_proj,
up_proj, ...) can be targeted too, each kind with its own A and B.

Per layer this is an ordinary LoRA (A' = u*A, B' = v*B), so it merges into W and exports as a
Hugging Face PEFT LoRA adapter. The flags (train, tie, init for A and B; train, init for u and v)
reach every freeze pattern of the family; presets fill them (see PRESETS and the rules in
`resolve_flags`).

Several adapters can sit on one backbone, and a mixed-tenant batch (`TiedLoraAdapter.routing`)
gathers each row's A, u, B, v once per batch (a tied tensor once for every layer) and applies
them with batched products.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..models import output_head_names
from .base import freeze, unique_parameters
from .common import (RequestRows, activate_only, adapter_layers, check_tenants, check_unmerged, check_unwrapped,
                     config_to_dict, layer_tenants, layers_disabled, load_named, snapshot)
from .targets import find_targets, is_linear, linear_features

DEFAULT = "default"
QKV = "qkv"
QKV_SPLIT = ("q_proj", "k_proj", "v_proj")  # Llama, Mistral, Qwen...: separate linears, this order
QKV_FUSED = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")  # GPT-2, GPT-NeoX/Falcon, Phi-3, MPT
MATRIX_INITS = ("kaiming", "gaussian", "zeros")
COMPONENTS = ("A", "B", "u", "v")
FLAGS = tuple(f"{k}_{c}" for c in "AB" for k in ("train", "tie", "init")) + tuple(
    f"{k}_{c}" for c in "uv" for k in ("train", "init")
)

# The DESIGN table. The paper does not give B's init for tl6 (v starts at 0, so B must not):
# Kaiming-uniform, as VeRA initializes its shared matrices, is our choice.
PRESETS: dict[str, dict[str, Any]] = {
    # the paper's vBuA without tying: a plain LoRA per layer (u, v fixed at 1)
    "lora": dict(train_A=True, tie_A=False, init_A="kaiming", train_B=True, tie_B=False, init_B="zeros",
                 train_u=False, init_u=1.0, train_v=False, init_v=1.0),
    "tl5": dict(train_A=True, tie_A=True, init_A="kaiming", train_B=True, tie_B=True, init_B="zeros",
                train_u=False, init_u=1.0, train_v=False, init_v=1.0),
    "tl6": dict(train_A=True, tie_A=True, init_A="kaiming", train_B=True, tie_B=True, init_B="kaiming",
                train_u=True, init_u=1.0, train_v=True, init_v=0.0),
    "vera": dict(train_A=False, tie_A=True, init_A="kaiming", train_B=False, tie_B=True, init_B="kaiming",
                 train_u=True, init_u=1.0, train_v=True, init_v=0.0),
}


def resolve_flags(cfg: Any) -> dict[str, Any]:
    """The preset's flags with every non-null override applied, checked against the rules:

    1. something trains;
    2. exactly one of A, B, u, v starts at zero: none would not start at the backbone, two would
       never move (each one's gradient is a product with the other);
    3. the zero-started factor trains, or the update stays zero for ever (a dead adapter);
    4. a frozen u or v is fixed at 1: another constant only rescales what A and B learn.
    """
    if cfg.preset not in PRESETS:
        raise ConfigError("method.preset", f"choose one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    flags = dict(PRESETS[cfg.preset])
    for key in FLAGS:
        value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
        if value is not None:
            flags[key] = value
    for c in "AB":
        if flags[f"init_{c}"] not in MATRIX_INITS:
            raise ConfigError(f"method.init_{c}", f"choose {' | '.join(MATRIX_INITS)}, got {flags[f'init_{c}']!r}")
    for c in "uv":
        flags[f"init_{c}"] = float(flags[f"init_{c}"])
        if not math.isfinite(flags[f"init_{c}"]):
            raise ConfigError(f"method.init_{c}", f"must be a finite number, got {flags[f'init_{c}']}")

    if not any(flags[f"train_{c}"] for c in COMPONENTS):
        raise ConfigError("method.train_A", "nothing trains: set one of method.train_A/B/u/v=true")
    zero = [c for c in "AB" if flags[f"init_{c}"] == "zeros"] + [c for c in "uv" if flags[f"init_{c}"] == 0.0]
    if not zero:
        raise ConfigError(
            "method.init_B",
            "no factor starts at zero, so the model would not start at the backbone; "
            "set method.init_B=zeros (with u, v fixed) or method.init_v=0 (with v trained)",
        )
    if len(zero) > 1:
        raise ConfigError(
            f"method.init_{zero[1]}",
            f"{' and '.join(zero)} all start at zero, so none of them ever gets a gradient (a dead "
            f"adapter); start only one at zero",
        )
    if not flags[f"train_{zero[0]}"]:
        c = zero[0]
        raise ConfigError(
            f"method.train_{c}",
            f"{c} starts at zero and is frozen, so the update stays zero (a dead adapter); "
            f"set method.train_{c}=true or start it non-zero",
        )
    for c in "uv":
        if not flags[f"train_{c}"] and flags[f"init_{c}"] != 1.0:
            raise ConfigError(
                f"method.init_{c}",
                f"a frozen {c} fixed at {flags[f'init_{c}']:g} only rescales what A and B learn; "
                f"set method.init_{c}=1 or method.train_{c}=true",
            )
    return flags


# ------------------------------------------------------------------------------------- targets
@dataclass
class Group:
    """One layer's instance of a target kind: the modules whose outputs are concatenated into
    one adapted projection (q, k, v; or a single module)."""

    kind: str  # "qkv" or a module-name suffix
    prefix: str  # the parent module's name, e.g. model.layers.0.self_attn
    members: list[str]  # full module names, in output order


def find_groups(model: nn.Module, targets: Any) -> list[Group]:
    key = "method.targets"
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(key, f"expected a list like [qkv] or [qkv,o_proj], got {targets!r}")
    groups: list[Group] = []
    for kind in targets:
        if kind == QKV:
            groups += _qkv_groups(model)
        else:
            groups += [Group(kind, n.rpartition(".")[0], [n]) for n in find_targets(model, [kind], key)]
    seen: set[str] = set()
    for g in groups:
        overlap = seen.intersection(g.members)
        if overlap:
            raise ConfigError(key, f"{sorted(overlap)[0]} is targeted twice (is it part of qkv?); list it once")
        seen.update(g.members)
    _check_shapes(model, groups)
    return groups


def _qkv_groups(model: nn.Module) -> list[Group]:
    heads = output_head_names(model)
    linears = {
        n for n, m in model.named_modules() if is_linear(m) and n not in heads and not n.endswith(".base_layer")
    }
    groups = []
    for name, _ in model.named_modules():
        split = [f"{name}.{s}" if name else s for s in QKV_SPLIT]
        if all(s in linears for s in split):
            groups.append(Group(QKV, name, split))
            continue
        fused = [f"{name}.{s}" for s in QKV_FUSED if f"{name}.{s}" in linears]
        if fused:
            groups.append(Group(QKV, name, fused[:1]))
    if not groups:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            "method.targets",
            f"qkv needs q_proj/k_proj/v_proj or a fused {'/'.join(QKV_FUSED)}; this model has: "
            f"{', '.join(kinds)} (name those instead)",
        )
    return groups


def _check_shapes(model: nn.Module, groups: list[Group]) -> None:
    by_kind: dict[str, set[tuple[int, int]]] = {}
    for g in groups:
        features = [linear_features(model.get_submodule(m)) for m in g.members]
        if len({f[0] for f in features}) != 1:
            raise ConfigError("method.targets", f"{g.members} read inputs of different sizes; they cannot share A")
        by_kind.setdefault(g.kind, set()).add((features[0][0], sum(f[1] for f in features)))
    for kind, shapes in by_kind.items():
        if len(shapes) > 1:
            raise ConfigError(
                "method.targets", f"{kind} has layers of different shapes {sorted(shapes)}; tied A/B need one shape"
            )


# --------------------------------------------------------------------------------------- modules
class TiedLoraBlock(nn.Module):
    """One layer's update on one group: v * (B (u * (A x))). A and B may be the same Parameter
    objects in every layer's block (tied); u and v are this layer's own.

    The members of a group (q, k, v) read the same input tensor, so the update is computed once
    and each member takes its slice; the cache is keyed by the input tensor itself."""

    def __init__(self, A: nn.Parameter, B: nn.Parameter, u: nn.Parameter, v: nn.Parameter,
                 dropout: float, num_members: int):
        super().__init__()
        self.A, self.B, self.u, self.v = A, B, u, v
        self.dropout = dropout
        self.num_members = num_members
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._uses = 0

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's plain-LoRA factors (A' = u*A, B' = v*B)."""
        return self.u[:, None] * self.A, self.v[:, None] * self.B

    def update(self, x: torch.Tensor) -> torch.Tensor:
        cache = self._cache
        version = 0 if x.is_inference() else x._version  # inference tensors have no counter
        if cache is not None and cache[0] is x and cache[1] == version:
            z = cache[2]
            self._uses += 1
        else:
            z = self.compute(x)
            self._cache, self._uses = (x, version, z), 1
        if self._uses >= self.num_members:
            self._cache = None  # every member took its slice: hold no activations
        return z

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.A.dtype)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return F.linear(F.linear(h, self.A) * self.u, self.B) * self.v


class TiedRouting:
    """One mixed-tenant batch on one backbone: the row-gathered tensors, shared by every layer
    (keyed by the identities of the tenants' tensors, so a tied A or B is gathered once), and
    each group's input product x A^T * u, computed once for its q, k and v."""

    def __init__(self, rows: RequestRows):
        self.rows = rows
        self.gathered: dict[tuple, torch.Tensor] = {}
        self.products: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}

    @torch.no_grad()
    def gather(self, kind: str, key: tuple, tensors: list[torch.Tensor | None], width: int, device) -> torch.Tensor:
        """Row i's tensor of kind "A" (r, in), "u" (r,), "B" (out, r) or "v" (out,): the
        tenants' tensors behind a zero slot, the rank axis zero-padded to `width`, per row.
        `key` names the tensors stably (a tied tensor has one key in every layer)."""
        key = (kind, width, key)
        if key not in self.gathered:
            real = [t for t in tensors if t is not None]
            shape = list(real[0].shape)
            rank_axis = 1 if kind == "B" else 0
            if kind != "v":  # v has no rank axis
                shape[rank_axis] = width
            stack = torch.zeros(len(tensors) + 1, *shape, device=device, dtype=real[0].dtype)
            for slot, t in enumerate(tensors, start=1):
                if t is not None:
                    stack[slot].narrow(rank_axis, 0, t.shape[rank_axis]).copy_(t)
            self.gathered[key] = stack.index_select(0, self.rows.slot.to(device))
        return self.gathered[key]

    def product(self, x: torch.Tensor, A: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(x A_i^T) * u_i per row i, (batch, tokens, r); reused while the same input comes back
        (q, k and v read one tensor). The input is held weakly: no activations are kept."""
        key = (id(A), id(u))
        version = 0 if x.is_inference() else x._version
        cached = self.products.get(key)
        if cached is not None and cached[0]() is x and cached[1] == version:
            return cached[2]
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)
        h = torch.bmm(flat, A.mT) * u[:, None, :]
        self.products[key] = (weakref.ref(x), version, h)
        return h


class TiedLoraLinear(nn.Module):
    """Wraps a frozen linear-like layer; per adapter name, the block it reads and its slice of
    the block's output."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.tied_lora = nn.ModuleDict()
        self.slices: dict[str, tuple[int, int]] = {}
        self.active_adapter: str | None = None
        self.merged: list[str] = []
        self.route: TiedRouting | None = None  # a mixed-tenant batch, see TiedLoraAdapter.routing
        self._routed: tuple[TiedRouting, tuple[torch.Tensor, ...] | None] | None = None

    def add_adapter(self, name: str, block: TiedLoraBlock, start: int) -> None:
        self.tied_lora[name] = block
        self.slices[name] = (start, start + self.out_features)
        self.active_adapter = name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.route is not None:
            if not self.route.rows.tenants:
                return out  # every row on the backbone
            if self.route.rows.single is None:
                return out + self._per_request(x).to(out.dtype)
            name = self.route.rows.single  # every row on one adapter: the plain path
        if name is None or name in self.merged or name not in self.tied_lora:
            return out
        start, end = self.slices[name]
        return out + self.tied_lora[name].update(x)[..., start:end].to(out.dtype)

    def _per_request(self, x: torch.Tensor) -> torch.Tensor:
        """v_i * (B_i (u_i * (A_i x))) for each row i with its own adapter's tensors (this
        module's slice of B and v), as batched products (inference only: no dropout)."""
        route = self.route
        route.rows.check_batch(x.shape[0])
        if self._routed is None or self._routed[0] is not route:
            self._routed = (route, self._gather(route, x.device))
        factors = self._routed[1]
        if factors is None:  # no tenant of this batch adapts this module
            return x.new_zeros(*x.shape[:-1], self.out_features)
        A, u, B, v = factors
        delta = torch.bmm(route.product(x, A, u), B.mT) * v[:, None, :]
        return delta.reshape(*x.shape[:-1], self.out_features)

    def _gather(self, route: TiedRouting, device) -> tuple[torch.Tensor, ...] | None:
        """Each row's A, u, and this module's slices of B and v (zeros: the backbone's rows)."""
        tenants = [n if n in self.tied_lora else None for n in route.rows.tenants]
        blocks = [self.tied_lora[n] if n is not None else None for n in tenants]
        if all(b is None for b in blocks):
            return None
        r = max(b.A.shape[0] for b in blocks if b is not None)
        slices = [self.slices[n] if n is not None else None for n in tenants]

        def key(c: str, sliced: bool = False) -> tuple:
            return tuple((id(getattr(b, c)), sl if sliced else None) if b is not None else None
                         for b, sl in zip(blocks, slices))

        def part(c: str, sliced: bool = False) -> list[torch.Tensor | None]:
            return [(getattr(b, c)[sl[0]:sl[1]] if sliced else getattr(b, c)) if b is not None else None
                    for b, sl in zip(blocks, slices)]

        return (route.gather("A", key("A"), part("A"), r, device), route.gather("u", key("u"), part("u"), r, device),
                route.gather("B", key("B", True), part("B", True), r, device),
                route.gather("v", key("v", True), part("v", True), r, device))

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B'[slice]) of this module: a standard LoRA with scale 1."""
        A, B = self.tied_lora[name].scaled_factors()
        start, end = self.slices[name]
        return A, B[start:end]

    def _delta(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.base_layer.weight
        if weight.__class__.__name__ in ("Params4bit", "Int8Params"):
            raise RuntimeError("merge needs an unquantized backbone: load it with model.quantization=null")
        A, B = self.lora_factors(name)
        delta = B @ A
        return weight, (delta.T if isinstance(self.base_layer, Conv1D) else delta).to(weight.dtype)

    def merge(self, name: str) -> None:
        if name not in self.merged:
            weight, delta = self._delta(name)
            weight.data += delta
            self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            weight, delta = self._delta(name)
            weight.data -= delta
            self.merged.remove(name)


# --------------------------------------------------------------------------------------- adapter
class TiedLoraAdapter:
    method = "tied_lora"
    supports_merge = True

    def __init__(self, model: nn.Module, blocks: dict[tuple[str, str], TiedLoraBlock],
                 layers: dict[str, TiedLoraLinear], flags: dict[str, Any], cfg: Any, name: str):
        self.model = model
        self.blocks = blocks  # (prefix, kind) -> block
        self.layers = layers  # full module name -> wrapper
        self.flags = flags
        self.cfg = cfg
        self.name = name

    # -- parameters and state
    def tensors(self) -> list[tuple[str, nn.Parameter]]:
        """Every tensor of the adapter, frozen ones included, each once: a tied A or B is named
        `<kind>.A`, per-layer ones `<prefix>.<kind>.<component>`."""
        named = []
        for (prefix, kind), block in self.blocks.items():
            for c in COMPONENTS:
                tied = c in "AB" and self.flags[f"tie_{c}"]
                named.append((f"{kind}.{c}" if tied else f"{prefix}.{kind}.{c}", getattr(block, c)))
        return unique_parameters(iter(named))

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        # From the flags, not requires_grad: attaching another adapter freezes the whole model.
        return [(n, p) for n, p in self.tensors() if self.flags[f"train_{n.rsplit('.', 1)[-1]}"]]

    def parameter_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(COMPONENTS, 0)
        for name, p in self.trainable_parameters():
            counts[name.rsplit(".", 1)[-1]] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        # Frozen tensors too: a frozen random A/B (vera) must come back exactly, not re-drawn.
        return snapshot(self.tensors())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        # Tied tensors are one Parameter shared by every block, so copying into it re-ties them.
        load_named(dict(self.tensors()), state)

    def config_dict(self) -> dict[str, Any]:
        # Flags resolved, so a saved adapter reloads the same pattern whatever the preset says later.
        return {**config_to_dict(self.cfg), **self.flags, "target_modules": sorted(self.layers)}

    def peft_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A standard LoRA per module: A' = u*A, B' = (v*B)[this module's slice], scale 1
        (lora_alpha = r)."""
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for mod, layer in self.layers.items():
                A, B = layer.lora_factors(self.name)
                tensors[f"base_model.model.{mod}.lora_A.weight"] = A.detach().clone().contiguous()
                tensors[f"base_model.model.{mod}.lora_B.weight"] = B.detach().clone().contiguous()
        r = int(self.cfg.r)
        config = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": r,
            "lora_dropout": float(self.cfg.dropout),
            "target_modules": sorted(self.layers),
            "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in self.layers.values()),
            "use_rslora": False,
            "bias": "none",
        }
        return config, tensors

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def callbacks(self) -> list[Any]:
        return []

    # -- switching
    def activate(self) -> None:
        """Make this adapter the only one the model applies (several may share the layers;
        layers it does not adapt apply none)."""
        activate_only(self.shared_layers(), self.name, "tied_lora")

    def shared_layers(self) -> list[TiedLoraLinear]:
        return adapter_layers(self.model, TiedLoraLinear)

    def tenants(self) -> list[str]:
        """Names of every Tied-LoRA adapter on the backbone."""
        return layer_tenants(self.shared_layers(), "tied_lora")

    @contextlib.contextmanager
    def routing(self, names: list[str | None]):
        """Within the context, batch row i goes through Tied-LoRA adapter names[i] (None: the
        backbone) on every Tied-LoRA layer of the backbone. Inference only."""
        layers = self.shared_layers()
        check_tenants(names, layer_tenants(layers, "tied_lora"))
        check_unmerged(layers)
        route = TiedRouting(RequestRows(names))
        for layer in layers:
            layer.route = route
        try:
            yield
        finally:
            for layer in layers:
                layer.route, layer._routed = None, None

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None) -> None:
        pass  # not prompt-aware

    def disabled(self) -> contextlib.AbstractContextManager:
        return layers_disabled(self.shared_layers(), self.name)

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge(self.name)

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge(self.name)

    def unload(self, model: nn.Module) -> nn.Module:
        """Merge into the backbone weights and put the wrapped layers back (peftrun.export)."""
        for mod, layer in self.layers.items():
            others = sorted(set(layer.tied_lora) - {self.name})
            if others:
                raise ValueError(f"{mod} also holds adapter(s) {others}; stripping the wrapper would drop them")
        self.merge()  # raises (before changing anything) on a quantized backbone
        for mod, layer in self.layers.items():
            parent_name, _, child = mod.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
        self.layers.clear()
        self.blocks.clear()
        return model


# ---------------------------------------------------------------------------------------- method
class TiedLoraMethod:
    name = "tied_lora"
    fsdp_unsupported = "its A and B are one tensor read by every layer, and FSDP shards layer by layer"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def check_config(self) -> dict[str, Any]:
        c = self.cfg
        if c.r <= 0:
            raise ConfigError("method.r", f"the rank must be a positive integer, got {c.r}")
        if not 0.0 <= c.dropout < 1.0:
            raise ConfigError("method.dropout", f"must be in [0, 1), got {c.dropout}")
        return resolve_flags(c)

    def check_model(self, model: nn.Module) -> None:
        find_groups(model, self.cfg.targets)

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT) -> TiedLoraAdapter:
        flags = self.check_config()
        groups = find_groups(model, self.cfg.targets)
        check_unwrapped(model, [m for g in groups for m in g.members], TiedLoraLinear, self.name)
        freeze(model)
        r = int(self.cfg.r)
        shared: dict[tuple[str, str], nn.Parameter] = {}  # (kind, "A"|"B") -> the tied tensor
        blocks: dict[tuple[str, str], TiedLoraBlock] = {}
        layers: dict[str, TiedLoraLinear] = {}
        for g in groups:
            first = model.get_submodule(g.members[0])
            weight = first.base_layer.weight if hasattr(first, "base_layer") else first.weight
            device = weight.device
            d_in = linear_features(first)[0]
            d_out = sum(linear_features(model.get_submodule(m))[1] for m in g.members)

            def matrix(c: str, shape: tuple[int, int]) -> nn.Parameter:
                if flags[f"tie_{c}"] and (g.kind, c) in shared:
                    return shared[(g.kind, c)]
                p = nn.Parameter(_init_matrix(shape, flags[f"init_{c}"], r, device), requires_grad=flags[f"train_{c}"])
                if flags[f"tie_{c}"]:
                    shared[(g.kind, c)] = p
                return p

            def vector(c: str, size: int) -> nn.Parameter:
                t = torch.full((size,), flags[f"init_{c}"], device=device, dtype=torch.float32)
                return nn.Parameter(t, requires_grad=flags[f"train_{c}"])

            block = TiedLoraBlock(
                matrix("A", (r, d_in)), matrix("B", (d_out, r)), vector("u", r), vector("v", d_out),
                float(self.cfg.dropout), len(g.members),
            )
            blocks[(g.prefix, g.kind)] = block
            start = 0
            for name in g.members:
                module = model.get_submodule(name)
                if not isinstance(module, TiedLoraLinear):
                    parent_name, _, child = name.rpartition(".")
                    module = TiedLoraLinear(module)
                    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
                module.add_adapter(adapter_name, block, start)
                start += module.out_features
                layers[name] = module
        return TiedLoraAdapter(model, blocks, layers, flags, self.cfg, adapter_name)


def _init_matrix(shape: tuple[int, int], init: str, r: int, device) -> torch.Tensor:
    t = torch.empty(shape, device=device, dtype=torch.float32)
    if init == "zeros":
        return t.zero_()
    if init == "gaussian":
        return nn.init.normal_(t, std=1.0 / r)
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # as nn.Linear, LoRA and VeRA
