"""Pooling of hidden states over masked positions (the prompt tokens), shared by the
prompt-aware methods (PARA, IAPT).

`hidden` is (batch, seq, width) and `mask` (batch, seq), nonzero on the positions to pool; every
row must have at least one such position (the caller checks once per batch, see `check_mask`).
Right-padded (training) and left-padded (generation) masks are both fine: nothing assumes
where the masked positions are.
"""

from __future__ import annotations

import math

import torch

POOLINGS = ("last", "mean", "max", "self_attention")


def check_mask(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"a pooling mask is (batch, seq), got shape {tuple(mask.shape)}")
    if not bool(mask.bool().any(dim=1).all()):
        raise ValueError("a row of the prompt mask has no prompt token: nothing to pool")


def last_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden state at each row's last masked position."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask.bool()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1)


def attention_pool(hidden: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Self-attention pooling with learnable queries: softmax over the masked positions of
    (hidden . query) / sqrt(width), then the weighted sum of hidden states.

    `queries` is (width,) for one pooled vector per row -> (batch, width), or (width, k) for k
    pooled vectors per row -> (batch, k, width). Zero queries give mean pooling."""
    width = hidden.shape[-1]
    q = queries.to(hidden.dtype)
    single = q.dim() == 1
    if single:
        q = q.unsqueeze(-1)  # (width, 1)
    scores = torch.einsum("btw,wk->btk", hidden, q) / math.sqrt(width)
    scores = scores.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    weights = scores.softmax(dim=1)  # over positions
    pooled = torch.einsum("btk,btw->bkw", weights, hidden)
    return pooled.squeeze(1) if single else pooled


def pool(hidden: torch.Tensor, mask: torch.Tensor, kind: str, queries: torch.Tensor | None = None) -> torch.Tensor:
    """One pooled vector per row: (batch, seq, width) -> (batch, width) (or (batch, k, width)
    for self-attention pooling with k queries)."""
    if kind == "last":
        return last_pool(hidden, mask)
    if kind == "mean":
        return mean_pool(hidden, mask)
    if kind == "max":
        return max_pool(hidden, mask)
    if kind == "self_attention":
        if queries is None:
            raise ValueError("self_attention pooling needs its learnable queries")
        return attention_pool(hidden, mask, queries)
    raise ValueError(f"unknown pooling {kind!r}; choose one of {', '.join(POOLINGS)}")


def by_example(mask: torch.Tensor, segment_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where each example's masked positions sit in a packed batch: `index` (examples, width)
    into the flattened (rows * seq) positions, and `valid` (examples, width), False on the padding
    of shorter examples. `pool(flat[index], valid, ...)` then pools each example on its own and
    `vectors[segment_ids.clamp(min=0)]` hands every token its example's result. None when
    `segment_ids` is None (one example per row: pool the rows as they are)."""
    if segment_ids is None:
        return None
    flat_ids = segment_ids.flatten()
    picked = mask.flatten().bool() & (flat_ids >= 0)
    positions = torch.nonzero(picked).flatten()
    examples = int(flat_ids.max()) + 1 if flat_ids.numel() else 0
    # By example, in position order within each (whatever order the examples are numbered in).
    owner, order = torch.sort(flat_ids[positions], stable=True)
    positions = positions[order]
    counts = torch.bincount(owner, minlength=examples)
    if examples and bool((counts == 0).any()):
        raise ValueError("an example of the packed batch has no prompt token: nothing to pool")
    width = int(counts.max()) if examples else 0
    # each example's positions come together: rank within its example
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(positions.numel(), device=mask.device) - starts[owner]
    index = torch.zeros(examples, width, dtype=torch.long, device=mask.device)
    valid = torch.zeros(examples, width, dtype=torch.bool, device=mask.device)
    index[owner, rank] = positions
    valid[owner, rank] = True
    return index, valid
