"""Mixture-of-experts weights as adapter targets. In transformers 5 the experts of Mixtral,
Qwen2/3-MoE, GPT-OSS and DeepSeek are stacked 3-D parameters of one module (E experts, each an
(out, in) matrix; GPT-OSS stores (in, out): `is_transposed`), not linear layers. An expert
parameter is targeted by its full name (`model.layers.1.mlp.experts.gate_up_proj`), by its last
name (`gate_up_proj`), or through its module's name (`experts`).

An adapter on one such parameter is a wrapper module in place of the experts module (`ExpertsLayer`),
one per parameter, nested when several parameters of one module are adapted (as Hugging Face
PEFT's `target_parameters` nests its ParamWrapper): at each forward it runs the experts with the
parameter replaced by weight + update, through the module's own code (`run_with`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..base import AdapterLayer, replace_module


def walk(module: nn.Module, path: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(canonical path, module) of the backbone's own modules: through an adapter wrapper only to
    the module it wraps (at the wrapper's path), never into the adapter's tensors."""
    if isinstance(module, AdapterLayer):
        base = getattr(module, "base_layer", None)
        if base is not None:
            yield from walk(base, path)
        return
    yield path, module
    if getattr(module, "adapter_owned", False):
        return
    for name, child in module.named_children():
        yield from walk(child, f"{path}.{name}" if path else name)


def expert_parameters(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Full parameter name -> (module path, parameter name) of every stacked expert weight."""
    return {f"{path}.{name}" if path else name: (path, name)
            for path, module in walk(model)
            for name, p in module.named_parameters(recurse=False) if p.dim() == 3}


def innermost(module: nn.Module) -> nn.Module:
    """The module at the bottom of a chain of adapter wrappers."""
    while isinstance(module, AdapterLayer) and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its expert weights (E, in, out), multiplied as x @ W (GPT-OSS):
    transformers 5 marks its experts classes (`use_experts_implementation(is_transposed=...)`);
    unmarked ones are taken as (E, out, in), F.linear's layout."""
    return bool(getattr(module, "is_transposed", False))


@dataclass(frozen=True)
class ExpertLayout:
    num_experts: int
    transposed: bool  # stored (E, in, out)
    features: tuple[int, int]  # (in, out) of one expert


def expert_layout(base_layer: nn.Module, param: str) -> ExpertLayout:
    owner = innermost(base_layer)
    weight = getattr(owner, param)
    transposed = is_transposed(owner)
    features = (weight.shape[1], weight.shape[2]) if transposed else (weight.shape[2], weight.shape[1])
    return ExpertLayout(weight.shape[0], transposed, features)


class ExpertsLayer(AdapterLayer):
    """Mixin of an adapter layer on one stacked expert parameter `param` (of `num_experts`,
    `transposed` as expert_layout says): where the parameter lives, how to run the experts with
    it replaced, merge and unwrap."""

    base_layer: nn.Module
    param: str
    num_experts: int
    transposed: bool

    def base_weight(self) -> torch.Tensor:
        return getattr(innermost(self.base_layer), self.param)

    def _path(self) -> str:
        """The parameter's path relative to base_layer."""
        path, module = self.param, self.base_layer
        while isinstance(module, AdapterLayer) and hasattr(module, "base_layer"):
            path, module = f"base_layer.{path}", module.base_layer
        return path

    def oriented(self, delta: torch.Tensor) -> torch.Tensor:
        """An (E, out, in) update in the parameter's own layout."""
        return delta.transpose(1, 2) if self.transposed else delta

    def run_with(self, delta: torch.Tensor | None, args: tuple, kwargs: dict) -> Any:
        """The experts with weight + delta ((E, out, in); None: the weight as it is)."""
        if delta is None:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight()
        replaced = weight + self.oriented(delta).to(weight.dtype)
        return torch.func.functional_call(self.base_layer, {self._path(): replaced}, args, kwargs, strict=False)

    # -- forward: one pass with this adapter's delta, or the tokens split into groups (the copies
    # of an ALoRA ablation batch, the tenants of a mixed batch), each group with its own delta.
    # Nested wrappers (several expert weights of one module) split once: the outer one runs each
    # group through the inner ones with `group` set, and they apply their delta of that group.
    group: int | None = None

    def plain_delta(self) -> torch.Tensor | None:
        """The (E, out, in) update of a plain forward (None: none)."""
        raise NotImplementedError

    def group_delta(self, i: int) -> torch.Tensor | None:
        """The update of token group i of a split forward."""
        raise NotImplementedError

    def token_groups(self, n_tokens: int) -> list[torch.Tensor] | None:
        """Token indices per group, or None for one pass. The experts receive the batch's tokens
        flattened row after row: a row's tokens are one block."""
        rows = self.route.rows if self.route is not None else None
        if rows is not None and rows.tenants and rows.single is None:
            per = n_tokens // len(rows)
            slots = rows.slot.tolist()
            return [torch.tensor([t for r, s in enumerate(slots) if s == g for t in range(r * per, (r + 1) * per)],
                                 dtype=torch.long) for g in range(len(rows.tenants) + 1)]
        gate = getattr(self, "ablation_gate", None)
        if gate is not None:
            per = n_tokens // gate.shape[0]
            return [torch.arange(k * per, (k + 1) * per) for k in range(gate.shape[0])]
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.group is not None:
            return self.run_with(self.group_delta(self.group), args, kwargs)
        groups = self.token_groups(args[0].shape[0])
        if groups is None:
            return self.run_with(self.plain_delta(), args, kwargs)
        return self.run_split(groups, args, kwargs)

    def _inner(self) -> list["ExpertsLayer"]:
        out, node = [], self.base_layer
        while isinstance(node, ExpertsLayer):
            out.append(node)
            node = node.base_layer
        return out

    def run_split(self, groups: list[torch.Tensor], args: tuple, kwargs: dict) -> Any:
        hidden = args[0]
        rows = hidden.shape[0]
        out = None
        inner = self._inner()
        for i, index in enumerate(groups):
            if index.numel() == 0:
                continue
            index = index.to(hidden.device)
            pick = tuple(a.index_select(0, index) if torch.is_tensor(a) and a.shape[:1] == (rows,) else a for a in args)
            picked = {k: v.index_select(0, index) if torch.is_tensor(v) and v.shape[:1] == (rows,) else v
                      for k, v in kwargs.items()}
            for layer in inner:
                layer.group = i
            try:
                part = self.run_with(self.group_delta(i), pick, picked)
            finally:
                for layer in inner:
                    layer.group = None
            out = part.new_zeros(rows, *part.shape[1:]) if out is None else out
            out = out.index_copy(0, index, part)
        return out

    def fold(self, delta: torch.Tensor, sign: float) -> None:
        weight = self.base_weight()
        if weight.__class__.__name__ in ("Params4bit", "Int8Params"):
            raise RuntimeError("merge needs an unquantized backbone: load it with model.quantization=null")
        weight.data += sign * self.oriented(delta).to(weight.dtype)

    def unwrap_in(self, model: nn.Module, name: str) -> None:
        """Take this wrapper out of the chain at its experts module's path."""
        path = name.rpartition(".")[0]
        parent_path, _, attr = path.rpartition(".")
        holder = model.get_submodule(parent_path) if parent_path else model
        node = getattr(holder, attr)
        while node is not self:
            holder, attr, node = node, "base_layer", node.base_layer
        setattr(holder, attr, self.base_layer)


def wrap_expert(model: nn.Module, name: str, path: str, param: str, layer_type: type) -> nn.Module:
    """The `layer_type` wrapper of expert parameter `name` (at module `path`): the one already in
    the chain there, or a new one put at `path` around what is there."""
    node = model.get_submodule(path)
    while isinstance(node, AdapterLayer):
        if isinstance(node, layer_type) and node.param == param:
            return node
        node = node.base_layer
    layer = layer_type(model.get_submodule(path), param)
    replace_module(model, path, layer)
    return layer
