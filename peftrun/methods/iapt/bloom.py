"""IAPT on Bloom, whose attention is computed inline (ALiBi biases, no attention function to
wrap): while IAPT applies, the attention module's forward is this one, the same computation with
the soft keys joined as in attention.py. Soft keys sit at no position: their ALiBi bias is 0, the
bias of the first position. Its fused q|k|v is interleaved per head (common/layouts.py)."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend


def install(attn: nn.Module) -> None:
    if getattr(attn, "pretraining_tp", 1) > 1 and getattr(attn, "slow_but_exact", False):
        raise ValueError("IAPT on Bloom needs slow_but_exact=false (its tensor-parallel output split is not supported)")
    attn.forward = types.MethodType(forward, attn)


def soft_keys_values(attn: nn.Module, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, key, value = attn._reshape(attn.query_key_value(soft))  # (batch, heads, n_soft, head_dim)
    return key, value


def _attention(module, query, key, value, mask, alibi):
    """Bloom's attention over `key`; the ALiBi bias of keys it does not cover (soft keys in front)
    is 0. Returns (output (B, T, H, D), probabilities)."""
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    if alibi.shape[-1] < k_len:
        alibi = F.pad(alibi, (k_len - alibi.shape[-1], 0))
    scores = alibi.baddbmm(batch1=query.reshape(batch * heads, q_len, dim),
                           batch2=key.reshape(batch * heads, k_len, dim).transpose(-1, -2),
                           beta=module.beta, alpha=module.inv_norm_factor).view(batch, heads, q_len, k_len)
    if mask is not None:
        mask = mask[..., :k_len]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = module.attention_dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype))
    out = torch.bmm(probs.view(batch * heads, q_len, k_len), value.reshape(batch * heads, k_len, dim))
    return out.view(batch, heads, q_len, dim).transpose(1, 2), probs


def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
            output_attentions=False, **kwargs):
    layer = self.iapt
    if layer.soft_kv is None:
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                                  output_attentions, **kwargs)
    batch, q_len, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)

    def original(module, q, k, v, mask, **_):
        return _attention(module, q, k, v, mask, alibi)

    out, probs = attend(original, self, query, key, value, attention_mask, merge=False)
    output = self.dense(out.reshape(batch, q_len, -1))
    return F.dropout(output, p=self.hidden_dropout, training=self.training) + residual, probs
