"""IAPT's attention: soft tokens join a layer's attention as extra key/value positions through
transformers' attention-function registry. `register` adds "iapt_sdpa" / "iapt_eager" (wrapping
the original function, same mask builder); the wrapper reads the soft keys/values the layer's
pre-hook set (layer.py).

One attention call per layer wherever PyTorch's CPU flash kernel runs the real attention (SDPA on
CPUs), in training and at prefill as at decode: the kernel gives the real keys' output and the
log-sum-exp of their scores, differentiable in both (real_attention.py), and the few soft keys
are merged in through it, gate included (soft_merge.py). Elsewhere (eager attention, other
devices, soft-capped or windowed attention, Bloom's inline ALiBi): decode steps still merge, with
the log-sum-exp from one q.K product, while training and prefill call the attention jointly over
[soft; real] keys, and once more over the real keys alone when a gate blends the two."""

from __future__ import annotations

import sys

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .real_attention import attention_with_lse
from .soft_merge import merge_soft, mergeable, real_lse

PREFIX = "iapt_"
SUPPORTED_ATTENTION = ("sdpa", "eager")


def _joint_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, n_soft: int,
                soft_visible: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's mask with n_soft columns in front that every real token (padding included)
    sees, or, with `soft_visible`, those of its row (batch, n_soft) or its own (batch, Tq,
    n_soft: packed rows). A None mask means causal over the last Tq of Tk positions."""
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        mask = mask.expand(query.shape[0], 1, q_len, k_len)
    mask = mask[..., :k_len]
    if soft_visible is None:
        visible = torch.ones if mask.dtype == torch.bool else torch.zeros  # bool: True sees; float: 0 adds
        soft = visible(*mask.shape[:-1], n_soft, dtype=mask.dtype, device=mask.device)
    else:
        seen = soft_visible.to(mask.device)
        seen = seen[:, None, None, :] if seen.dim() == 2 else seen[:, None, :, :]
        if mask.dtype != torch.bool:
            seen = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(
                ~seen, torch.finfo(mask.dtype).min)
        batch = max(mask.shape[0], seen.shape[0])
        soft = seen.expand(batch, mask.shape[1], q_len, n_soft)
        mask = mask.expand(batch, *mask.shape[1:])
    return torch.cat([soft, mask], dim=-1)


class Captured(Exception):
    """Raised by the attention function while a layer computes its soft tokens' keys and values
    through the attention module's own code (keys.py `soft_keys_values`): carries them out."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__("soft keys and values")
        self.key, self.value = key, value


def attend(original, module, query, key, value, attention_mask, fast: bool = False, merge: bool = True,
           **kwargs):
    """The attention `original` over [soft; real] keys, blended per head by the layer's gate with
    the attention over the real keys alone (no gate: the joint attention). `fast`: `original` is
    SDPA (the CPU flash kernel may give the log-sum-exp); `merge`: the soft keys may be merged
    through the log-sum-exp instead of a joint call."""
    layer = module.iapt
    soft_k, soft_v = layer.soft_kv
    scaling = kwargs.get("scaling")
    if merge and mergeable(kwargs):
        real = attention_with_lse(module, query, key, value, attention_mask, kwargs) if fast else None
        weights = None
        # A decode step: L from one q.K product (a None mask is causal unless there is one query).
        if (real is None and layer.decoding and not torch.is_grad_enabled()
                and (attention_mask is not None or query.shape[2] == 1)):
            out, weights = original(module, query, key, value, attention_mask, **kwargs)
            real = out.transpose(1, 2), real_lse(query, key, attention_mask, scaling)
        if real is not None:
            out, lse = real
            return merge_soft(query, out, lse, soft_k, soft_v, layer.soft_visible, scaling, layer.gate), weights
    joint, weights = original(
        module, query, torch.cat([soft_k, key], dim=2), torch.cat([soft_v, value], dim=2),
        _joint_mask(attention_mask, query, key, soft_k.shape[2], layer.soft_visible), **kwargs,
    )
    if layer.gate is None:
        return joint, weights
    out, weights = original(module, query, key, value, attention_mask, **kwargs)
    gate = layer.gate.to(out.dtype)  # out: (B, T, H, D)
    return out + gate * (joint - out), weights


def _wrap(original_name: str):
    def iapt_attention(module, query, key, value, attention_mask, **kwargs):
        if original_name == "eager":  # each model file has its own eager function
            original = sys.modules[type(module).__module__].eager_attention_forward
        else:
            original = ALL_ATTENTION_FUNCTIONS[original_name]
        layer = getattr(module, "iapt", None)
        if layer is not None and layer.capturing:
            raise Captured(key, value)
        if layer is None or layer.soft_kv is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        return attend(original, module, query, key, value, attention_mask, fast=original_name == "sdpa", **kwargs)

    return iapt_attention


def register(original_name: str) -> str:
    name = PREFIX + original_name
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _wrap(original_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original_name])
    return name
