"""IAPT, Instruction-Aware Prompt Tuning (Zhu et al., ACL 2024): per layer, a generator turns the
instruction's hidden states into `n_soft` soft tokens that join that layer's attention as extra
key/value positions (deep prompts, P-tuning v2 style).

Generator of layer l (input: the attention module's input, i.e. the normalized hidden states the
frozen k/v projections read):

    h = down(x)                                   d -> m (bottleneck)
    w = softmax over instruction positions of (h Q / sqrt(m))     Q: learnable m x n_soft queries
    s = up(R(w^T h))                              R: rational activation, m -> d; s: n_soft x d

The soft tokens' keys and values come from the layer's own frozen projections (k_proj/v_proj, or
GPT-2's fused c_attn). They get no rotary position: like a prefix, they sit outside the sequence,
so real tokens keep their positions and the KV cache its layout.

Exact start at the backbone. Extra key positions change the softmax normalization even with
zero values, so zero-initialising `up` is not enough. Each layer has a per-head gate g (init 0):

    out = out_backbone + g * (out_with_soft_tokens - out_backbone)

With g = 1 this is exactly P-tuning v2's joint softmax over [soft tokens; real tokens]; with
g = 0 it is the backbone bit for bit. (The paper has no gate; it does not claim an exact start.)
The price: two attention calls per layer at prefill and in training. Decode steps stay cheap:
the joint output is merged from the attention over the real keys and the soft keys' scores (see
`_merged_joint`), with no copy of the KV cache.

Mechanism: transformers' attention-function registry. attach() registers "iapt_sdpa" /
"iapt_eager" (wrapping the original function, same mask builder) and points the model config at
it; a forward pre-hook on each attention module computes the soft keys/values. With a KV cache the
soft keys/values are computed at prefill (empty cache) and reused at every decode step.

Several adapters can sit on one backbone: one active for every row, or one per row of a
mixed-tenant batch (`IaptAdapter.routing`): each row's soft tokens come from its own adapter's
generator, and its gate from that adapter (0 for the backbone's rows).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Mapping

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..errors import ConfigError
from .base import freeze, unique_parameters
from .common import (RequestRows, activate_only, adapter_layers, check_tenants, config_to_dict, layer_tenants,
                     layers_disabled, load_named, snapshot)
from .rational import Rational, available_inits, degree_key

DEFAULT = "default"
PREFIX = "iapt_"
SUPPORTED_ATTENTION = ("sdpa", "eager")


# ----------------------------------------------------------------------------- architecture
def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Self-attention modules by name: Llama-style (k_proj, v_proj) or GPT-2-style (fused c_attn)."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "layer_idx")
        and ((hasattr(m, "k_proj") and hasattr(m, "v_proj")) or hasattr(m, "c_attn"))
        and not getattr(m, "is_cross_attention", False)
    }


def soft_keys_values(attn: nn.Module, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (batch, kv_heads, n_soft, head_dim) of the soft tokens, through the layer's
    own frozen projections (GQA: as many heads as k_proj gives)."""
    if hasattr(attn, "c_attn"):  # GPT-2: one Conv1D gives q | k | v
        _, key, value = attn.c_attn(soft).split(attn.split_size, dim=2)
    else:
        key, value = attn.k_proj(soft), attn.v_proj(soft)
    shape = (*soft.shape[:-1], -1, attn.head_dim)
    return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)


# -------------------------------------------------------------------------------- generator
class SoftPromptGenerator(nn.Module):
    """down (d -> m), self-attention pooling into n_soft vectors, rational activation, up (m -> d)."""

    def __init__(self, hidden: int, bottleneck: int, n_soft: int, degrees: tuple[int, int], init: str, device=None):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, device=device)
        # Learnable pooling queries; with the 1/sqrt(m) score scale they start near mean pooling.
        self.queries = nn.Parameter(torch.randn(bottleneck, n_soft, device=device) * bottleneck**-0.5)
        self.activation = Rational(*degrees, init=init, device=device)
        self.up = nn.Linear(bottleneck, hidden, device=device)

    def forward(self, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, d), prompt_mask (B, T) bool -> soft tokens (B, n_soft, d)."""
        h = self.down(hidden)
        scores = (h @ self.queries) * h.shape[-1] ** -0.5  # (B, T, n_soft)
        keep = prompt_mask[..., None]
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        # Softmax over instruction positions only; a row with no instruction token pools to 0.
        weights = scores.softmax(dim=1) * keep
        pooled = weights.transpose(1, 2) @ h  # (B, n_soft, m)
        return self.up(self.activation(pooled))


class PromptState:
    """The prompt mask of the next forward, shared by every IAPT layer of a model."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def for_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The mask as (hidden batch, hidden length) bool: rows repeated for beam search /
        num_return_sequences (the batch is expanded with repeat_interleave), columns padded with
        0 when the sequence grew past the prompt (generation without a KV cache)."""
        batch, length = hidden.shape[:2]
        if self.mask is None:  # nobody said which tokens are the prompt: all of them are
            return torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        mask = self.mask.to(device=hidden.device, dtype=torch.bool)
        if batch != mask.shape[0]:
            if batch % mask.shape[0]:
                raise RuntimeError(f"IAPT: prompt mask of {mask.shape[0]} rows for a batch of {batch}")
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        if mask.shape[1] > length:
            raise RuntimeError(f"IAPT: prompt mask of width {mask.shape[1]} for {length} positions")
        return nn.functional.pad(mask, (0, length - mask.shape[1]), value=False)


class IaptLayer(nn.Module):
    """IAPT's state in one attention module: generators and gates keyed by adapter name (several
    adapters can sit on one backbone), and the soft keys/values of the current batch."""

    adapter_owned = True  # its linear layers are IAPT's, not targets for another method

    def __init__(self, prompt: PromptState, num_heads: int):
        super().__init__()
        self.generators = nn.ModuleDict()
        self.gates = nn.ParameterDict()
        self.num_heads = num_heads
        self.active_adapter: str | None = None
        self.route: RequestRows | None = None  # a mixed-tenant batch: one adapter per row
        self.prompt = prompt
        # Of the current batch, set at prefill: the soft keys/values, the gate (per row when
        # routed), and which soft positions each row sees (None: all; routed tenants may differ
        # in n_soft, their soft tokens are then zero-padded and the padding hidden).
        self.soft_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.gate: torch.Tensor | None = None
        self.soft_visible: torch.Tensor | None = None
        self.decoding = False  # the KV cache holds this layer's past: the soft tokens are the prefill's

    def add_adapter(self, name: str, generator: SoftPromptGenerator, device=None) -> None:
        self.generators[name] = generator
        self.gates[name] = nn.Parameter(torch.zeros(self.num_heads, device=device))
        self.active_adapter = name


def _pre_hook(attn: nn.Module, args: tuple, kwargs: dict) -> None:
    """Compute this layer's soft keys/values before its attention runs (prefill or full forward);
    keep the prefill's ones while a KV cache already holds this layer's past."""
    layer: IaptLayer = attn.iapt
    rows = layer.route
    name = layer.active_adapter if rows is None else rows.single
    if rows is None or rows.single is not None:
        if name not in layer.generators:
            layer.soft_kv = layer.gate = None
            return
    elif not any(n in layer.generators for n in rows.tenants):
        layer.soft_kv = layer.gate = None
        return
    hidden = args[0] if args else kwargs["hidden_states"]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layer.decoding = cache is not None and cache.get_seq_length(attn.layer_idx) > 0
    if layer.decoding:
        if layer.soft_kv is None or layer.soft_kv[0].shape[0] != hidden.shape[0]:
            raise RuntimeError("IAPT: a decode step without the soft tokens of its prefill; "
                               "start generation from the prompt (empty cache)")
        return
    prompt_mask = layer.prompt.for_hidden(hidden)
    layer.soft_visible = None
    if name is not None:
        soft = layer.generators[name](hidden.float(), prompt_mask).to(hidden.dtype)
        layer.gate = layer.gates[name].view(1, 1, -1, 1)  # (B, T, H, D) outputs
    else:
        soft, layer.gate, layer.soft_visible = _per_request(layer, rows, hidden, prompt_mask)
    layer.soft_kv = soft_keys_values(attn, soft)


def _per_request(layer: IaptLayer, rows: RequestRows, hidden: torch.Tensor, prompt_mask: torch.Tensor):
    """Soft tokens (batch, n_soft, d), gates (batch, 1, H, 1) and soft visibility of a
    mixed-tenant batch: each tenant's generator reads only its rows; the backbone's rows get
    zero soft tokens and a zero gate (exactly the backbone)."""
    rows.check_batch(hidden.shape[0])
    tenants = [n for n in rows.tenants if n in layer.generators]
    n_soft = {n: layer.generators[n].queries.shape[1] for n in tenants}
    width = max(n_soft.values())
    soft = hidden.new_zeros(hidden.shape[0], width, hidden.shape[-1])
    gate = layer.gates[tenants[0]].new_zeros(hidden.shape[0], layer.num_heads)
    visible = torch.ones(hidden.shape[0], width, dtype=torch.bool, device=hidden.device)
    for name in tenants:
        index = rows.rows(name, hidden.device)
        own = layer.generators[name](hidden.index_select(0, index).float(), prompt_mask.index_select(0, index))
        soft[index, : n_soft[name]] = own.to(hidden.dtype)
        gate[index] = layer.gates[name].to(gate.dtype)
        visible[index, n_soft[name]:] = False
    return soft, gate.view(-1, 1, layer.num_heads, 1), None if bool(visible.all()) else visible


# -------------------------------------------------------------------------------- attention
def _joint_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, n_soft: int,
                soft_visible: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's mask with n_soft columns in front that every real token (padding included)
    sees, or, with `soft_visible` (batch, n_soft), those of its row. A None mask means causal
    over the last Tq of Tk positions."""
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        mask = mask.expand(query.shape[0], 1, q_len, k_len)
    mask = mask[..., :k_len]
    if soft_visible is None:
        visible = torch.ones if mask.dtype == torch.bool else torch.zeros  # bool: True sees; float: 0 adds
        soft = visible(*mask.shape[:-1], n_soft, dtype=mask.dtype, device=mask.device)
    else:
        seen = soft_visible[:, None, None, :].to(mask.device)
        if mask.dtype != torch.bool:
            seen = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(
                ~seen, torch.finfo(mask.dtype).min)
        batch = max(mask.shape[0], seen.shape[0])
        soft = seen.expand(batch, *mask.shape[1:-1], n_soft)
        mask = mask.expand(batch, *mask.shape[1:])
    return torch.cat([soft, mask], dim=-1)


def _wrap(original_name: str):
    def iapt_attention(module, query, key, value, attention_mask, **kwargs):
        if original_name == "eager":  # each model file has its own eager function
            original = sys.modules[type(module).__module__].eager_attention_forward
        else:
            original = ALL_ATTENTION_FUNCTIONS[original_name]
        layer = getattr(module, "iapt", None)
        if layer is None or layer.soft_kv is None or layer.gate is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        soft_k, soft_v = layer.soft_kv
        if layer.decoding and not torch.is_grad_enabled() and _mergeable(query, attention_mask, kwargs):
            fused = _attention_with_lse(original_name, query, key, value, attention_mask, kwargs)
            if fused is None:
                out, weights = original(module, query, key, value, attention_mask, **kwargs)
                real_lse = _real_lse(query, key, attention_mask, kwargs.get("scaling"))
            else:
                (out, real_lse), weights = fused, None
            joint = _merged_joint(query, out, real_lse, soft_k, soft_v, layer.soft_visible, kwargs.get("scaling"))
        else:
            out, weights = original(module, query, key, value, attention_mask, **kwargs)
            joint, _ = original(
                module, query, torch.cat([soft_k, key], dim=2), torch.cat([soft_v, value], dim=2),
                _joint_mask(attention_mask, query, key, soft_k.shape[2], layer.soft_visible), **kwargs,
            )
        gate = layer.gate.to(out.dtype)  # out: (B, T, H, D)
        return out + gate * (joint - out), weights

    return iapt_attention


# Decode steps. The joint softmax over [soft; real] keys follows from the attention over the real
# keys alone, `out`, and their log-sum-exp L of the scores: with s the soft keys' scores,
#     joint = (e^L out + sum e^s v_soft) / (e^L + sum e^s),
# so no concatenated copy of the KV cache and no second pass over it. On CPUs, PyTorch's flash
# kernel (what SDPA runs there) returns L with the output; elsewhere L costs one q.K product.
# Query heads are grouped by the key/value head they read (GQA, in repeat_kv's order); the
# result equals the joint attention call up to float rounding.
def _mergeable(query: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> bool:
    extras = any(kwargs.get(k) for k in ("softcap", "sliding_window", "position_bias", "s_aux", "sinks"))
    # A None mask with several query positions means causal, which L would have to follow.
    return not extras and not kwargs.get("dropout") and (mask is not None or query.shape[2] == 1)


def _attention_with_lse(original_name: str, query, key, value, mask, kwargs):
    """(out (B, 1, H, D), L (B, KV, G, 1)) from one call of the CPU flash kernel, or None where
    it does not apply (then the original attention and `_real_lse` are used)."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if (flash is None or original_name != "sdpa" or query.device.type != "cpu" or query.shape[2] != 1
            or query.dtype not in (torch.float32, torch.bfloat16)):
        return None
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    if mask is not None:
        mask = mask[..., : key.shape[2]]
        if mask.dtype == torch.bool:  # as SDPA converts it
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    try:
        out, lse = flash(query.reshape(batch, kv_heads, heads // kv_heads, dim), key, value, 0.0, False,
                         attn_mask=mask, scale=kwargs.get("scaling"))
    except RuntimeError:  # a build or input this kernel refuses
        return None
    return out.reshape(batch, 1, heads, dim), lse.unsqueeze(-1)


def _real_lse(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """L of the scores over the real keys, (B, KV, G*Tq, 1)."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, group * q_len, dim).float()
    scores = (q @ key.float().mT * scale).view(batch, kv_heads, group, q_len, -1)
    if mask is not None:
        mask = mask[..., : key.shape[2]].unsqueeze(2)  # (B, 1, 1, Tq, Tk)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.logsumexp(scores, dim=-1).view(batch, kv_heads, group * q_len, 1)


def _merged_joint(query: torch.Tensor, out: torch.Tensor, real_lse: torch.Tensor, soft_k: torch.Tensor,
                  soft_v: torch.Tensor, soft_visible: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """The joint attention output (B, Tq, H, D) from the real keys' `out` (B, Tq, H, D) and L."""
    batch, heads, q_len, dim = query.shape
    kv_heads = soft_k.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, -1, dim).float()
    soft_scores = q @ soft_k.float().mT * scale  # (B, KV, G*Tq, S)
    if soft_visible is not None:
        soft_scores = soft_scores.masked_fill(~soft_visible[:, None, None, :].to(soft_scores.device), float("-inf"))
    real_lse = real_lse.reshape(batch, kv_heads, -1, 1).float()
    top = torch.maximum(real_lse, soft_scores.amax(dim=-1, keepdim=True))
    real_mass, soft_mass = (real_lse - top).exp(), (soft_scores - top).exp()
    real_out = out.transpose(1, 2).reshape(batch, kv_heads, -1, dim).float()
    joint = (real_mass * real_out + soft_mass @ soft_v.float()) / (real_mass + soft_mass.sum(dim=-1, keepdim=True))
    return joint.reshape(batch, heads, q_len, dim).transpose(1, 2).to(out.dtype)


def _register(original_name: str) -> str:
    name = PREFIX + original_name
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _wrap(original_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original_name])
    return name


# ---------------------------------------------------------------------------------- adapter
KINDS = {"down": "down", "queries": "pooling", "activation": "rational", "up": "up", "gate": "gate"}


class IaptAdapter:
    method = "iapt"
    supports_merge = False

    def __init__(self, model: nn.Module, layers: dict[str, IaptLayer], cfg: Any, name: str):
        self.model = model
        self.layers = layers
        self.cfg = cfg
        self.name = name
        self.prompt = next(iter(layers.values())).prompt

    # -- parameters and state
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named = []
        for mod, layer in self.layers.items():
            named += [(f"{mod}.iapt.{n}", p) for n, p in layer.generators[self.name].named_parameters()]
            named.append((f"{mod}.iapt.gate", layer.gates[self.name]))
        return unique_parameters(iter(named))

    @staticmethod
    def _kind(name: str) -> str:
        return KINDS[name.split(".iapt.", 1)[1].split(".", 1)[0]]

    def parameter_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS.values(), 0)
        for name, p in self.trainable_parameters():
            counts[self._kind(name)] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The rational coefficients train at their own learning rate (the authors' 1e-6)."""
        rational_lr = lr if self.cfg.rational_lr is None else self.cfg.rational_lr
        named = self.trainable_parameters()
        return [
            {"params": [p for n, p in named if self._kind(n) != "rational"], "lr": lr},
            {"params": [p for n, p in named if self._kind(n) == "rational"], "lr": rational_lr},
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return snapshot(self.trainable_parameters())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_named(dict(self.trainable_parameters()), state)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def callbacks(self) -> list[Any]:
        if self.cfg.rational_update == "alternating":
            from .iapt_rational_update import AlternatingRationalUpdate

            return [AlternatingRationalUpdate(self)]
        return []

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None) -> None:
        self.prompt.mask = prompt_mask

    # -- switching
    def activate(self) -> None:
        """Make this adapter the only one the model applies (several may share the layers;
        layers it does not adapt apply none)."""
        activate_only(self.shared_layers(), self.name, "generators")

    def shared_layers(self) -> list[IaptLayer]:
        return adapter_layers(self.model, IaptLayer)

    def tenants(self) -> list[str]:
        """Names of every IAPT adapter on the backbone."""
        return layer_tenants(self.shared_layers(), "generators")

    @contextlib.contextmanager
    def routing(self, names: list[str | None]):
        """Within the context, batch row i goes through IAPT adapter names[i] (None: the
        backbone): its soft tokens come from that adapter's generator at prefill."""
        layers = self.shared_layers()
        check_tenants(names, layer_tenants(layers, "generators"))
        rows = RequestRows(names)
        for layer in layers:
            layer.route = rows
        try:
            yield
        finally:
            for layer in layers:
                layer.route = None
                layer.soft_kv = layer.gate = layer.soft_visible = None
                layer.decoding = False

    def disabled(self) -> contextlib.AbstractContextManager:
        return layers_disabled(self.shared_layers(), self.name)

    def merge(self) -> None:
        raise ValueError("IAPT cannot be merged: its soft tokens depend on each prompt "
                         "(keep the adapter attached, or save it with save_adapter)")

    def unmerge(self) -> None:
        pass  # never merged

    def unload(self, model: nn.Module) -> nn.Module:
        self.merge()  # raises: peftrun.export.merge_into_backbone calls this
        return model


class IaptMethod:
    name = "iapt"

    def __init__(self, cfg: Any):
        self.cfg = cfg

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

    def check_model(self, model: nn.Module) -> None:
        modules = attention_modules(model)
        layers = getattr(model.config, "num_hidden_layers", None)
        if not modules or (layers is not None and len(modules) != layers):
            raise ConfigError(
                "method.name",
                f"IAPT needs one self-attention per layer with k_proj/v_proj (Llama-like) or c_attn "
                f"(GPT-2); found {len(modules)} for {layers} layers in {type(model).__name__}; pick another method",
            )

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT) -> IaptAdapter:
        self.check_config()
        self.check_model(model)
        impl = model.config._attn_implementation or "eager"
        original = impl.removeprefix(PREFIX)
        if original not in SUPPORTED_ATTENTION:
            raise ConfigError("model.attn_implementation",
                              f"IAPT adds key positions through {'/'.join(SUPPORTED_ATTENTION)} attention, "
                              f"not {impl}; set model.attn_implementation=sdpa")
        model.config._attn_implementation = _register(original)
        freeze(model)
        c = self.cfg
        hidden = model.config.hidden_size
        prompt = PromptState()
        layers: dict[str, IaptLayer] = {}
        for name, attn in attention_modules(model).items():
            weight = next(attn.parameters())
            device = weight.device
            if not hasattr(attn, "iapt"):
                attn.iapt = IaptLayer(prompt, model.config.num_attention_heads)
                attn.register_forward_pre_hook(_pre_hook, with_kwargs=True)
            generator = SoftPromptGenerator(hidden, c.bottleneck, c.n_soft, tuple(c.rational_degrees),
                                            c.rational_init, device=device)
            attn.iapt.add_adapter(adapter_name, generator, device=device)
            layers[name] = attn.iapt
        return IaptAdapter(model, layers, c, adapter_name)
