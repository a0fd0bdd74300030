"""IAPT, Instruction-Aware Prompt Tuning (Zhu et al., ACL 2024): per layer, a generator turns the
instruction's hidden states into `n_soft` soft tokens that join that layer's attention as extra
key/value positions (deep prompts, P-tuning v2 style).

Generator of layer l (input: the attention module's input, i.e. the normalized hidden states the
frozen k/v projections read):

    h = down(x)                                   d -> m (bottleneck)
    w = softmax over instruction positions of (h Q / sqrt(m))     Q: learnable m x n_soft queries
    s = up(R(w^T h))                              R: rational activation, m -> d; s: n_soft x d

The soft tokens' keys and values come from the layer's own frozen code (keys.py: its projections,
fused or not, and its key normalization where it has one). They get no rotary position: like a
prefix, they sit outside the sequence, so real tokens keep their positions and the KV cache its
layout.

Exact start at the backbone (`gate: per_head`, the default). Extra key positions change the
softmax normalization even with zero values, so zero-initialising `up` is not enough. Each layer
has a per-head gate g (init 0):

    out = out_backbone + g * (out_with_soft_tokens - out_backbone)

With g = 1 this is exactly P-tuning v2's joint softmax over [soft tokens; real tokens]; with
g = 0 it is the backbone bit for bit. The paper has no gate (`gate: none`: the joint softmax,
no exact start). Either form costs one attention call per layer where PyTorch's CPU flash kernel
runs the attention: the soft keys are merged through the real attention's log-sum-exp
(attention.py, real_attention.py, soft_merge.py), with no copy of the KV cache at decode.

Mechanism: transformers' attention-function registry. attach() registers "iapt_sdpa" /
"iapt_eager" (wrapping the original function, same mask builder) and points the model config at
it; a forward pre-hook on each attention module computes the soft keys/values. With a KV cache the
soft keys/values are computed at prefill (empty cache) and reused at every decode step.

Several adapters can sit on one backbone: one active for every row, or one per row of a
mixed-tenant batch (`IaptAdapter.routing`): each row's soft tokens come from its own adapter's
generator, and its gate from that adapter (0 for the backbone's rows). Packed rows (several
examples in a row, `set_prompt_mask(..., segment_ids)`): each example's soft tokens come from its
own prompt and only its tokens see them (packed.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..base import DEFAULT_ADAPTER, Adapter, Method, freeze
from ..common.layouts import hidden_size
from ..common.rational import available_inits, degree_key
from ..common.state import unique_parameters
from ..registry import register_method
from .attention import PREFIX, SUPPORTED_ATTENTION, register
from .config import GATES, IaptConfig
from .keys import attention_layouts, custom_attention
from .layer import IaptLayer, PromptState, SoftPromptGenerator, _pre_hook
from .rational_update import AlternatingRationalUpdate

KINDS = {"down": "down", "queries": "pooling", "activation": "rational", "up": "up", "gate": "gate"}


class IaptAdapter(Adapter):
    method = "iapt"
    family = "iapt"
    layer_type = IaptLayer
    parameter_kinds = tuple(KINDS.values())

    def __init__(self, model: nn.Module, cfg: Any, name: str, layers: dict[str, IaptLayer]):
        super().__init__(model, cfg, name, layers)
        self.prompt = next(iter(layers.values())).prompt

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named = []
        for mod, layer in self.layers.items():
            named += [(f"{mod}.iapt.{n}", p) for n, p in layer.generators[self.name].named_parameters()]
            if layer.gate_of(self.name) is not None:
                named.append((f"{mod}.iapt.gate", layer.gates[self.name]))
        return unique_parameters(named)

    def kind_of(self, name: str) -> str:
        return KINDS[name.split(".iapt.", 1)[1].split(".", 1)[0]]

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The rational coefficients train at their own learning rate (the authors' 1e-6), and
        the gates at theirs where `gate_lr` is set (null: with the rest, at trainer.lr)."""
        own_lr = {"rational": self.cfg.rational_lr}
        if self.cfg.gate_lr is not None:
            own_lr["gate"] = self.cfg.gate_lr
        named = self.trainable_parameters()
        groups = [{"params": [p for n, p in named if self.kind_of(n) not in own_lr], "lr": lr}]
        for kind, kind_lr in own_lr.items():
            params = [p for n, p in named if self.kind_of(n) == kind]
            if params:
                groups.append({"params": params, "lr": lr if kind_lr is None else kind_lr})
        return groups

    def callbacks(self) -> list[Any]:
        return [AlternatingRationalUpdate(self)] if self.cfg.rational_update == "alternating" else []

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None, segment_ids: torch.Tensor | None = None) -> None:
        self.prompt.set(prompt_mask, segment_ids)

    def merge_refusal(self) -> str:
        return ("IAPT cannot be merged (method 'iapt' does not support merging): its soft tokens depend on "
                "each prompt; keep the adapter attached, or save it with save_adapter")


@register_method
class IaptMethod(Method):
    name = "iapt"
    config_class = IaptConfig
    adapter_class = IaptAdapter
    attach_order = 1  # its generators hold linear layers that a later all-linear LoRA would wrap

    def check_config(self) -> None:
        c = self.cfg
        if c.bottleneck <= 0:
            raise ConfigError("method.bottleneck", f"must be a positive integer, got {c.bottleneck}")
        if c.n_soft <= 0:
            raise ConfigError("method.n_soft", f"must be a positive integer (the paper uses 4), got {c.n_soft}")
        fits = available_inits()
        if c.rational_init not in fits:
            raise ConfigError("method.rational_init", f"choose one of {', '.join(fits)}, got {c.rational_init!r}")
        if len(c.rational_degrees) != 2:
            raise ConfigError("method.rational_degrees", f"give [m, n], e.g. [6, 5]; got {list(c.rational_degrees)}")
        key = degree_key(*c.rational_degrees)
        if key not in fits[c.rational_init]:
            raise ConfigError(
                "method.rational_degrees",
                f"no shipped {c.rational_init} fit of degrees {key}; use one of {', '.join(fits[c.rational_init])} "
                f"or run scripts/fit_rational.py --degrees {key}",
            )
        if c.rational_lr is not None and c.rational_lr < 0:
            raise ConfigError("method.rational_lr", f"must be >= 0 (or null for trainer.lr), got {c.rational_lr}")
        if c.rational_update not in ("joint", "alternating"):
            raise ConfigError("method.rational_update", f"choose joint or alternating, got {c.rational_update!r}")
        if c.rational_update_every <= 0 or c.rational_dev_batch_size <= 0:
            raise ConfigError("method.rational_update_every",
                              "rational_update_every and rational_dev_batch_size must be positive")
        if c.gate not in GATES:
            raise ConfigError("method.gate", f"choose {' or '.join(GATES)} (none: the paper's form, no gate), "
                                             f"got {c.gate!r}")
        if c.gate_lr is not None and c.gate == "none":
            raise ConfigError("method.gate_lr", "there is no gate with method.gate=none; set method.gate_lr=null")
        if c.gate_lr is not None and c.gate_lr < 0:
            raise ConfigError("method.gate_lr", f"must be >= 0 (or null for trainer.lr), got {c.gate_lr}")

    def check_model(self, model: nn.Module) -> None:
        attention_layouts(model)  # ConfigError naming why, where IAPT cannot join the attention

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> IaptAdapter:
        self.check_config()
        found = attention_layouts(model)
        impl = model.config._attn_implementation or "eager"
        original = impl.removeprefix(PREFIX)
        if original not in SUPPORTED_ATTENTION:
            suggest = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
            raise ConfigError("model.attn_implementation",
                              f"IAPT adds key positions through {'/'.join(SUPPORTED_ATTENTION)} attention, "
                              f"not {impl}; set model.attn_implementation={suggest}")
        model.config._attn_implementation = register(original)
        freeze(model)
        c = self.cfg
        hidden = hidden_size(model.config)
        prompt = PromptState()
        layers: dict[str, IaptLayer] = {}
        for name, (attn, layout) in found.items():
            weight = next(attn.parameters())
            device = weight.device
            if not hasattr(attn, "iapt"):
                attn.iapt = IaptLayer(prompt, layout.heads.num_heads)
                attn.register_forward_pre_hook(_pre_hook, with_kwargs=True)
                custom = custom_attention(attn)
                if custom is not None:
                    custom.install(attn)
            generator = SoftPromptGenerator(hidden, c.bottleneck, c.n_soft, tuple(c.rational_degrees),
                                            c.rational_init, device=device)
            attn.iapt.add_adapter(adapter_name, generator, gated=c.gate == "per_head", device=device)
            layers[name] = attn.iapt
        return IaptAdapter(model, c, adapter_name, layers)
