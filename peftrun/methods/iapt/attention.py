"""IAPT's attention: soft tokens join a layer's attention as extra key/value positions through
transformers' attention-function registry. `register` adds "iapt_sdpa" / "iapt_eager" (wrapping
the original function, same mask builder); the wrapper reads the soft keys/values the layer's
pre-hook set (layer.py). Training and prefill run the attention twice (over the real keys, and
jointly with the soft ones) and blend them by the per-head gate; decode steps merge the soft
keys' scores into the real attention's output without a second pass over the KV cache."""

from __future__ import annotations

import sys

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

PREFIX = "iapt_"
SUPPORTED_ATTENTION = ("sdpa", "eager")


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


class Captured(Exception):
    """Raised by the attention function while a layer computes its soft tokens' keys and values
    through the attention module's own code (layer.py `soft_keys_values`): carries them out."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__("soft keys and values")
        self.key, self.value = key, value


def attend(original, module, query, key, value, attention_mask, fast: bool = False, mergeable: bool = True,
           **kwargs):
    """The attention `original` over the real keys, blended per head by the layer's gate with the
    joint attention over [soft; real] keys. `fast`: `original` is SDPA (the CPU flash kernel may
    give the log-sum-exp); `mergeable`: the decode-step merge may replace the joint call."""
    layer = module.iapt
    soft_k, soft_v = layer.soft_kv
    if mergeable and layer.decoding and not torch.is_grad_enabled() and _mergeable(query, attention_mask, kwargs):
        fused = _attention_with_lse(fast, query, key, value, attention_mask, kwargs) if fast else None
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


def _wrap(original_name: str):
    def iapt_attention(module, query, key, value, attention_mask, **kwargs):
        if original_name == "eager":  # each model file has its own eager function
            original = sys.modules[type(module).__module__].eager_attention_forward
        else:
            original = ALL_ATTENTION_FUNCTIONS[original_name]
        layer = getattr(module, "iapt", None)
        if layer is not None and layer.capturing:
            raise Captured(key, value)
        if layer is None or layer.soft_kv is None or layer.gate is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        return attend(original, module, query, key, value, attention_mask, fast=original_name == "sdpa", **kwargs)

    return iapt_attention


# Decode steps. The joint softmax over [soft; real] keys follows from the attention over the real
# keys alone, `out`, and their log-sum-exp L of the scores: with s the soft keys' scores,
#     joint = (e^L out + sum e^s v_soft) / (e^L + sum e^s),
# so no concatenated copy of the KV cache and no second pass over it. On CPUs, PyTorch's flash
# kernel (what SDPA runs there) returns L with the output; elsewhere L costs one q.K product.
# Query heads are grouped by the key/value head they read (GQA, in repeat_kv's order); the
# result equals the joint attention call up to float rounding.
def _given(value) -> bool:
    """Whether an attention keyword is in use: a tensor (GPT-OSS's sinks) is, whatever it holds."""
    return value is not None and (isinstance(value, torch.Tensor) or bool(value))


def _mergeable(query: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> bool:
    # Soft-capped scores, sliding windows, position biases and attention sinks change the real
    # attention's normalization in ways the merge below does not follow: those use the joint call.
    extras = any(_given(kwargs.get(k)) for k in ("softcap", "sliding_window", "position_bias", "s_aux", "sinks"))
    # A None mask with several query positions means causal, which L would have to follow.
    return not extras and not _given(kwargs.get("dropout")) and (mask is not None or query.shape[2] == 1)


def _attention_with_lse(fast: bool, query, key, value, mask, kwargs):
    """(out (B, 1, H, D), L (B, KV, G, 1)) from one call of the CPU flash kernel, or None where
    it does not apply (then the original attention and `_real_lse` are used)."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if (flash is None or not fast or query.device.type != "cpu" or query.shape[2] != 1
            or query.dtype not in (torch.float32, torch.bfloat16)):
        return None
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    if value.shape[-1] != dim:
        return None
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
    """The joint attention output (B, Tq, H, Dv) from the real keys' `out` (B, Tq, H, Dv) and L."""
    batch, heads, q_len, dim = query.shape
    v_dim = out.shape[-1]  # DeepSeek's values are narrower than its queries
    kv_heads = soft_k.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, -1, dim).float()
    soft_scores = q @ soft_k.float().mT * scale  # (B, KV, G*Tq, S)
    if soft_visible is not None:
        soft_scores = soft_scores.masked_fill(~soft_visible[:, None, None, :].to(soft_scores.device), float("-inf"))
    real_lse = real_lse.reshape(batch, kv_heads, -1, 1).float()
    top = torch.maximum(real_lse, soft_scores.amax(dim=-1, keepdim=True))
    real_mass, soft_mass = (real_lse - top).exp(), (soft_scores - top).exp()
    real_out = out.transpose(1, 2).reshape(batch, kv_heads, -1, v_dim).float()
    joint = (real_mass * real_out + soft_mass @ soft_v.float()) / (real_mass + soft_mass.sum(dim=-1, keepdim=True))
    return joint.reshape(batch, heads, q_len, v_dim).transpose(1, 2).to(out.dtype)


def register(original_name: str) -> str:
    name = PREFIX + original_name
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _wrap(original_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original_name])
    return name

