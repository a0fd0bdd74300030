"""Which modules Tied-LoRA adapts: per layer, groups of modules whose outputs form one adapted
projection (q|k|v as one, GQA-aware; or a single module), of one shape per kind (tied A, B)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import ConfigError
from ..common.blocks import decoder_blocks
from ..common.experts import expert_layout, expert_parameters
from ..common.layouts import LayoutError, attention_layout
from ..common.targets import find_targets, linear_features

QKV = "qkv"


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
            experts = expert_parameters(model)
            # An expert weight is its own kind (an experts module's name selects all of them).
            groups += [Group(n.rsplit(".", 1)[-1] if n in experts else kind, n.rpartition(".")[0], [n])
                       for n in find_targets(model, [kind], key)]
    seen: set[str] = set()
    for g in groups:
        overlap = seen.intersection(g.members)
        if overlap:
            raise ConfigError(key, f"{sorted(overlap)[0]} is targeted twice (is it part of qkv?); list it once")
        seen.update(g.members)
    _check_shapes(model, groups)
    return groups


def _qkv_groups(model: nn.Module) -> list[Group]:
    """Per decoder block, the linears computing its attention's q, k and v from the block's input
    (common/layouts.py): q_proj, k_proj, v_proj; one fused q|k|v linear (GPT-2, Phi-3, GPT-NeoX,
    Falcon, Bloom...); DeepSeek's q_a_proj and kv_a_proj_with_mqa."""
    found = decoder_blocks(model)
    if found is None:
        raise ConfigError("method.targets", f"qkv: no list of decoder blocks in {type(model).__name__}; "
                                            "name the modules to adapt instead")
    prefix, blocks = found
    groups = []
    for i, block in enumerate(blocks):
        try:
            layout = attention_layout(model.config, block)
        except LayoutError as e:
            raise ConfigError("method.targets", f"qkv: {e}; name the modules to adapt instead") from None
        path = f"{prefix}.{i}"
        groups.append(Group(QKV, f"{path}.{layout.path}", [f"{path}.{m}" for m in layout.inputs]))
    return groups


def _features(model: nn.Module, name: str, experts: dict) -> tuple[int, ...]:
    """(in, out) of a linear; (in, out, experts) of a stacked expert weight."""
    if name in experts:
        path, param = experts[name]
        layout = expert_layout(model.get_submodule(path), param)
        return (*layout.features, layout.num_experts)
    return linear_features(model.get_submodule(name))


def _check_shapes(model: nn.Module, groups: list[Group]) -> None:
    experts = expert_parameters(model)
    by_kind: dict[str, set[tuple[int, ...]]] = {}
    for g in groups:
        features = [_features(model, m, experts) for m in g.members]
        if len({f[0] for f in features}) != 1:
            raise ConfigError("method.targets", f"{g.members} read inputs of different sizes; they cannot share A")
        by_kind.setdefault(g.kind, set()).add((features[0][0], sum(f[1] for f in features), *features[0][2:]))
    for kind, shapes in by_kind.items():
        if len(shapes) > 1:
            raise ConfigError(
                "method.targets", f"{kind} has layers of different shapes {sorted(shapes)}; tied A/B need one shape"
            )
