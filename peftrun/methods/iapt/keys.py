"""Which modules IAPT joins (one self-attention per decoder block, found from the block's layout),
and the soft tokens' keys and values.

The keys and values of the soft tokens are those the layer's own code computes for real tokens
(projections, MQA/GQA, fused q|k|v layouts, the key normalization of Qwen3, OLMo2 and Gemma 3,
DeepSeek's latent attention), with no position: the attention module runs on the soft tokens with
an identity rotary embedding (cos 1, sin 0: position 0), no cache and no mask, and the attention
function (attention.py) hands back the keys and values it is given instead of attending. Nothing
of the module runs after that, and no module hook fires. Bloom computes its attention inline
(no attention function): its soft keys come from its fused projection directly (bloom.py).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..common.blocks import decoder_blocks
from ..common.layouts import AttentionLayout, LayoutError, attention_layout
from .attention import Captured

CACHE_NAMES = ("past_key_values", "past_key_value", "layer_past", "cache")


def attention_layouts(model: nn.Module) -> dict[str, tuple[nn.Module, AttentionLayout]]:
    """Full name -> (self-attention module, its layout), one per decoder block; ConfigError
    naming why where the model has none IAPT can join."""
    found = decoder_blocks(model)
    if found is None:
        raise ConfigError("method.name", f"IAPT finds no list of decoder blocks in {type(model).__name__}; "
                                         "pick another method")
    prefix, blocks = found
    out = {}
    for i, block in enumerate(blocks):
        try:
            layout = attention_layout(model.config, block)
        except LayoutError as e:
            raise ConfigError("method.name", f"IAPT cannot join the attention of {prefix}.{i}: {e}; "
                                             "pick another method") from None
        attn = block.get_submodule(layout.path)
        if not (custom_attention(attn) or _calls_attention_functions(attn)):
            raise ConfigError("method.name", f"IAPT adds key positions through transformers' attention functions, "
                                             f"which {type(attn).__name__} does not call; pick another method")
        out[f"{prefix}.{i}.{layout.path}"] = (attn, layout)
    return out


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Self-attention modules by name, one per decoder block."""
    return {name: attn for name, (attn, _) in attention_layouts(model).items()}


def custom_attention(attn: nn.Module):
    """The module holding IAPT's own attention for an architecture that computes it inline."""
    if type(attn).__name__ == "BloomAttention":
        from . import bloom

        return bloom
    return None


def _calls_attention_functions(attn: nn.Module) -> bool:
    return hasattr(sys.modules[type(attn).__module__], "ALL_ATTENTION_FUNCTIONS")


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def call_arguments(attn: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The attention's call as {parameter: value}, extra keywords flattened in."""
    if not args:  # all by keyword (the Llama family's decoder layers): nothing to bind
        return kwargs
    bound = _signature(type(attn)).bind(attn, *args, **kwargs).arguments
    bound.pop("self", None)
    flat = {}
    for name, value in bound.items():
        kind = _signature(type(attn)).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            flat[name] = value
    return flat


def call_cache(call: dict[str, Any]):
    return next((call[n] for n in CACHE_NAMES if call.get(n) is not None), None)


def soft_keys_values(attn: nn.Module, soft: torch.Tensor, call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (batch, kv_heads, n_soft, head_dim) of the soft tokens `soft` (batch,
    n_soft, d), as the attention computes them for real tokens, position-free. `call`: the
    arguments of the attention's real call (call_arguments)."""
    custom = custom_attention(attn)
    if custom is not None:
        return custom.soft_keys_values(attn, soft)
    batch, n_soft = soft.shape[:2]
    args = dict(call)
    args["hidden_states"] = soft
    for name in CACHE_NAMES + ("attention_mask", "encoder_hidden_states"):
        if name in args:
            args[name] = None
    for name in ("use_cache", "output_attentions"):
        if name in args:
            args[name] = False
    if args.get("position_embeddings") is not None:  # rotary at no position: cos 1, sin 0
        cos, sin = args["position_embeddings"]
        shape = (*cos.shape[:-2], n_soft, cos.shape[-1])
        args["position_embeddings"] = (cos.new_ones(shape), sin.new_zeros(shape))
    if args.get("position_ids") is not None:  # GPT-J computes its rotary from the positions
        args["position_ids"] = torch.zeros(batch, n_soft, dtype=torch.long, device=soft.device)
    if args.get("cache_position") is not None:
        args["cache_position"] = torch.arange(n_soft, device=soft.device)
    layer = attn.iapt
    layer.capturing = True
    try:
        attn.forward(**args)  # the module's code, without its hooks
    except Captured as got:
        return got.key, got.value
    finally:
        layer.capturing = False
    raise RuntimeError(f"IAPT: {type(attn).__name__} never called its attention function")
