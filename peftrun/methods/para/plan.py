"""Where PARA's vectors go: per decoder layer, which output columns of which projections each
entry of the generated vector scales (by role: q, k, v, o, gate, up, down). The columns come from
the block's layout (common/layouts.py): separate projections, a fused q|k|v in blocks (GPT-2,
Phi-3, StarCoder's multi-query c_attn), interleaved per head (GPT-NeoX, Bloom) or per key/value
group (Falcon-40B), DeepSeek's latent attention (k and v: their columns of kv_b_proj)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...errors import ConfigError
from ..common.blocks import decoder_blocks
from ..common.layouts import Columns, LayoutError, attention_layout, mlp_layout
from ..common.targets import linear_features

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


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


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(full name, ModuleList) of the model's decoder layers."""
    found = decoder_blocks(model)
    if found is None:
        raise ConfigError("method.name", f"PARA finds no list of decoder layers in {type(model).__name__}; "
                                         "pick another method")
    return found


def role_columns(model: nn.Module, layer: nn.Module, path: str) -> tuple[dict[str, Columns | None], str | None]:
    """(role -> the columns it scales in this layer, None where the layer has no such projection;
    the layer's stacked experts module, if its MLP is a mixture of experts)."""
    try:
        attn = attention_layout(model.config, layer)
    except LayoutError as e:
        raise ConfigError("method.name", f"PARA cannot place its vectors in {path}: {e}; pick another method") from None
    mlp = mlp_layout(model.config, layer, attn.path)
    o = None
    if attn.output is not None:
        o = Columns(attn.output, ((0, linear_features(layer.get_submodule(attn.output))[1]),))
    down = None
    if mlp.down is not None:
        down = Columns(mlp.down, ((0, linear_features(layer.get_submodule(mlp.down))[1]),))
    return {"q": attn.q, "k": attn.k, "v": attn.v, "o": o, "gate": mlp.gate, "up": mlp.up, "down": down}, mlp.experts


def _missing(path: str, role: str, experts: str | None, have: list[str]) -> ConfigError:
    if experts is not None and role in ("gate", "up", "down"):
        why = (f"its MLP is a mixture of experts ({experts}) whose experts are stacked 3-D weights, with no "
               f"dense {role} projection to scale")
    else:
        why = f"it has no {role} projection"
    return ConfigError("method.targets", f"layer {path} cannot take role {role!r}: {why}; "
                                         f"method.targets=[{','.join(have)}] works on this model")


def plan_layers(model: nn.Module, targets: list[str]) -> list[LayerPlan]:
    """Which output columns of which modules each layer's vector scales; raises ConfigError."""
    prefix, layers = decoder_layers(model)
    found = [(f"{prefix}.{i}", layer, *role_columns(model, layer, f"{prefix}.{i}")) for i, layer in enumerate(layers)]
    # Roles every layer has (the hint of a refusal), in the order of ROLES.
    have = [r for r in ROLES if all(cols[r] is not None for _, _, cols, _ in found)]
    plans = []
    for path, layer, cols, experts in found:
        plan = LayerPlan(path=path, layer=layer)
        for role in targets:
            columns = cols[role]
            if columns is None:
                raise _missing(path, role, experts, [r for r in ("q", "v", "up") if r in have] or have)
            plan.out_features[columns.module] = linear_features(layer.get_submodule(columns.module))[1]
            for start, end in columns.ranges:
                plan.segments.setdefault(columns.module, []).append(Segment(start, end, plan.width))
                plan.width += end - start
        for segs in plan.segments.values():
            segs.sort(key=lambda s: s.start)
        plans.append(plan)
    return plans
