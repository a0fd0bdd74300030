"""Where PARA's vectors go: per decoder layer, which output columns of which projections each
entry of the generated vector scales (by role: q, k, v, o, gate, up, down)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...errors import ConfigError
from ..common.blocks import decoder_blocks
from ..common.targets import linear_features

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
    found = decoder_blocks(model, lambda block: any(_has(block, roles["q"][0]) for roles in LAYOUTS.values()))
    if found is None:
        raise ConfigError(
            "method.name",
            "PARA knows Llama-style (q_proj, v_proj, up_proj) and GPT-2 (c_attn, c_fc) decoder layers "
            "and found neither in this model; pick another method",
        )
    name, module = found
    layout = next(layout for layout, roles in LAYOUTS.items() if _has(module[0], roles["q"][0]))
    return layout, name, module


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

