"""Which modules Tied-LoRA adapts: per layer, groups of modules whose outputs form one adapted
projection (q|k|v as one, GQA-aware; or a single module), of one shape per kind (tied A, B)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import ConfigError
from ...models import output_head_names
from ..common.targets import find_targets, is_linear, linear_features

QKV = "qkv"
QKV_SPLIT = ("q_proj", "k_proj", "v_proj")  # Llama, Mistral, Qwen...: separate linears, this order
QKV_FUSED = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")  # GPT-2, GPT-NeoX/Falcon, Phi-3, MPT


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

