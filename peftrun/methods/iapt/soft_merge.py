"""The soft keys merged into the attention over the real keys, without a second pass over them.

The joint softmax over [soft; real] keys follows from the real keys' attention output O and the
log-sum-exp L of their scores: with s the soft keys' scores (a handful per query),

    joint = O + a (O_soft - O),   a = sigmoid(logsumexp(s) - L),   O_soft = softmax(s) V_soft,

a being the soft keys' share of the joint softmax mass. IAPT's gate blends O and the joint
output, out = O + g (joint - O) = O + g a (O_soft - O): one `lerp` over the output, exactly O
where g = 0 (the backbone, bit for bit). Query heads are grouped by the key/value head they read
(GQA, in repeat_kv's order). Training and prefill get O and L from one kernel call
(real_attention.py); decode steps elsewhere get L from one q.K product (`real_lse`)."""

from __future__ import annotations

import torch

_FLOOR = -1e30  # stands for -inf where an exp or a difference must stay finite (and its gradient 0)


def _given(value) -> bool:
    """Whether an attention keyword is in use: a tensor (GPT-OSS's sinks) is, whatever it holds."""
    return value is not None and (isinstance(value, torch.Tensor) or bool(value))


def mergeable(kwargs: dict) -> bool:
    """Soft-capped scores, sliding windows, position biases, attention sinks and dropout change
    the real attention's normalization in ways the merge does not follow: those use the joint call."""
    extras = ("softcap", "sliding_window", "position_bias", "s_aux", "sinks", "dropout")
    return not any(_given(kwargs.get(k)) for k in extras)


def real_lse(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """L of the scores over the real keys (B, H, Tq), float32, from one q.K product; a None
    mask means every key is seen (one query: a decode step)."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, heads // kv_heads * q_len, dim).float()
    scores = (q @ key.float().mT * scale).view(batch, kv_heads, heads // kv_heads, q_len, -1)
    if mask is not None:
        mask = mask[..., : key.shape[2]].unsqueeze(2)  # (B, 1, 1, Tq, Tk)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.logsumexp(scores, dim=-1).view(batch, heads, q_len)


def merge_soft(query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, soft_k: torch.Tensor,
               soft_v: torch.Tensor, soft_visible: torch.Tensor | None, scaling: float | None,
               gate: torch.Tensor | None) -> torch.Tensor:
    """O + g a (O_soft - O) as (B, Tq, H, Dv), the layout attention functions return.

    query (B, H, Tq, D); out (B, H, Tq, Dv), a view of either layout; lse (B, H, Tq); soft_k/v
    (B, KV, S, D/Dv); soft_visible None, (B, S) per row or (B, Tq, S) per token (packed rows);
    gate (1 or B, 1, H, 1) or None for no gate (g = 1: the joint attention)."""
    batch, heads, q_len, dim = query.shape
    v_dim = out.shape[-1]  # DeepSeek's values are narrower than its queries
    kv_heads, n_soft = soft_k.shape[1], soft_k.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    grouped = (batch, kv_heads, group, q_len)
    # (B, KV, G*Tq, S): query heads of one key/value head side by side, one small product.
    scores = (query.reshape(batch, kv_heads, group * q_len, dim) @ soft_k.mT).float().view(*grouped, n_soft) * scale
    if soft_visible is not None:
        seen = soft_visible.to(scores.device)
        seen = seen[:, None, None, None, :] if seen.dim() == 2 else seen[:, None, None, :, :]
        scores = scores.masked_fill(~seen, float("-inf"))
    soft_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = (scores - soft_lse.clamp(min=_FLOOR)).exp()  # a query that sees no soft key: zeros
    soft_out = (probs.to(soft_v.dtype).view(batch, kv_heads, group * q_len, n_soft) @ soft_v).view(*grouped, v_dim)
    share = torch.sigmoid(soft_lse.clamp(min=_FLOOR) - lse.reshape(*grouped, 1).clamp(min=_FLOOR))
    if gate is not None:
        share = share * gate.transpose(1, 2).reshape(-1, kv_heads, group, 1, 1)
    blended = torch.lerp(out.reshape(*grouped, v_dim), soft_out.to(out.dtype), share.to(out.dtype))
    return blended.view(batch, heads, q_len, v_dim).transpose(1, 2).contiguous()
