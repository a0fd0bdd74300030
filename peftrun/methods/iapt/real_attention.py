"""The attention over the real keys together with the log-sum-exp L of its scores, both
differentiable, from one call of PyTorch's CPU flash kernel (what SDPA runs on CPUs): the soft
keys are then merged in through L (soft_merge.py) instead of a second attention call.

The kernel returns L, but autograd treats it as an output without gradient. `FlashWithLse` is
the same kernel with the gradient through L folded into the kernel's own backward. For softmax
attention the kernel computes dS_ij = P_ij (dP_ij - D_i) with D_i = rowsum(dO_i * O_i); since
dL_i / dS_ij = P_ij, a gradient dL_i on L adds P_ij dL_i, i.e. replaces D_i by D_i - dL_i. The
kernel reads O only to form D, so it gets O' = O - (dL_i / |dO_i|^2) dO_i, whose D is exactly
D_i - dL_i. A row whose dO is zero while its dL is not cannot be expressed that way; then the
call's gradients come from the plain math (`_math_gradients`), which such rows make rare.

Where the kernel does not apply (other devices, eager attention, a backend choice SDPA would not
make) `attention_with_lse` answers None and the caller falls back (attention.py)."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def attention_with_lse(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       mask: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out (B, H, Tq, D), L (B, H, Tq) float32) of the attention transformers' SDPA function
    would compute (same kernel, same mask handling, so the same bits), or None where the CPU
    flash kernel does not apply. A query row that sees no real key gets L = -inf."""
    if (_FLASH is None or _FLASH_BACKWARD is None or query.device.type != "cpu" or query.dtype not in _DTYPES
            or not key.shape[-1] == value.shape[-1] == query.shape[-1]):
        return None
    q_len, k_len = query.shape[2], key.shape[2]
    # As transformers' sdpa_attention_forward: causal when no mask is given for several queries.
    causal = kwargs.get("is_causal")
    causal = q_len > 1 and mask is None and bool(getattr(module, "is_causal", True) if causal is None else causal)
    if causal and k_len > q_len:  # prefill of an empty static cache: the rest is masked anyway
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    empty = None
    if mask is not None:
        mask = mask[..., :k_len]
        if mask.dtype == torch.bool:  # as SDPA converts it; rows with no visible key get L = -inf below
            empty = ~mask.any(dim=-1)
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        elif mask.dtype != query.dtype:
            return None
    gqa = query.shape[1] != key.shape[1]
    scale = kwargs.get("scaling")
    choice = torch._fused_sdp_choice(query, key, value, mask, 0.0, causal, scale=scale, enable_gqa=gqa)
    if choice != SDPBackend.FLASH_ATTENTION.value:  # SDPA would run another kernel: not the same bits
        return None
    out, lse = FlashWithLse.apply(query, key, value, mask, causal, scale)
    if empty is not None and bool(empty.any()):
        lse = lse.masked_fill(empty, float("-inf"))  # the kernel reports 0 there
    return out, lse


class FlashWithLse(torch.autograd.Function):
    """(out, L) of the CPU flash kernel, differentiable in both. Key/value heads may be fewer than
    query heads (GQA): the kernel groups them as transformers' repeat_kv does."""

    @staticmethod
    def forward(ctx, query, key, value, mask, causal: bool, scale: float | None):
        out, lse = _FLASH(query, key, value, 0.0, causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        query, key, value, out, lse, mask = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        if d_lse is not None:
            squared = d_out.float().square().sum(dim=-1)
            if bool(((squared == 0) & (d_lse != 0)).any()):
                grads = _math_gradients(query, key, value, mask, ctx.causal, ctx.scale, out, d_out, d_lse)
                return (*grads, None, None, None)
            shift = torch.where(squared > 0, d_lse / squared, torch.zeros_like(squared))
            out = (out.float() - shift.unsqueeze(-1) * d_out.float()).to(out.dtype)
        grads = _FLASH_BACKWARD(d_out, query, key, value, out, lse, 0.0, ctx.causal, attn_mask=mask, scale=ctx.scale)
        return (*grads, None, None, None)


def _math_gradients(query, key, value, mask, causal, scale, out, d_out, d_lse):
    """dQ, dK, dV of (out, L) by the plain softmax formulas, in float32 (float64 stays):
    dS = P (dO V^T - D + dL), D = rowsum(dO O)."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.to(work).view(batch, kv_heads, heads // kv_heads, q_len, dim)
    k, v = key.to(work).unsqueeze(2), value.to(work).unsqueeze(2)
    scale = dim**-0.5 if scale is None else scale
    scores = q @ k.mT * scale
    if causal:
        seen = torch.ones(q_len, key.shape[2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~seen, float("-inf"))
    if mask is not None:
        scores = scores + mask.to(work).unsqueeze(2)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = (scores - lse.clamp(min=torch.finfo(work).min)).exp()  # rows with no visible key: 0
    d_out = d_out.to(work).view_as(q)
    d_lse = d_lse.to(work).view(*q.shape[:-1], 1)
    row = (d_out * out.to(work).view_as(q)).sum(dim=-1, keepdim=True)
    d_scores = probs * (d_out @ v.mT - row + d_lse) * scale
    d_query = (d_scores @ k).view_as(query)
    d_key = (d_scores.mT @ q).sum(dim=2)
    d_value = (probs.mT @ d_out).sum(dim=2)
    return d_query.to(query.dtype), d_key.to(key.dtype), d_value.to(value.dtype)
