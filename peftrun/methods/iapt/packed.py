"""IAPT on packed rows (several examples in one row, data.collate_packed): each example's soft
tokens come from its own prompt and only its own tokens see them.

The examples' soft tokens are laid out per row in slots, `n_soft` positions per example of the
row: row b holds its examples' soft tokens side by side (zeros after the last), and a token sees
only its own example's slot. Keys and values are then computed for every slot at once, and the
attention treats them as soft keys with per-token visibility (attention.py, soft_merge.py)."""

from __future__ import annotations

import torch

from ..common.pooling import by_example


class PackedPrompts:
    """Where each example of a packed batch sits, computed once per batch and shared by every
    layer. segment_ids (rows, seq): each token's example, numbered over the batch from 0 in
    row-major order, -1 on padding; an example lies within one row."""

    def __init__(self, prompt_mask: torch.Tensor, segment_ids: torch.Tensor):
        segment_ids = segment_ids.to(prompt_mask.device).long()
        # index/valid (examples, width): each example's prompt positions in the flattened batch.
        self.index, self.valid = by_example(prompt_mask, segment_ids)
        rows, seq = segment_ids.shape
        examples = self.index.shape[0]
        real = segment_ids >= 0
        row_of_token = torch.arange(rows, device=segment_ids.device)[:, None].expand(rows, seq)
        ids, owners = segment_ids[real], row_of_token[real]
        lowest = torch.full((examples,), rows, device=ids.device).scatter_reduce(0, ids, owners, "amin")
        highest = torch.full((examples,), -1, device=ids.device).scatter_reduce(0, ids, owners, "amax")
        if not torch.equal(lowest, highest):
            raise ValueError("IAPT: an example of the packed batch spans several rows; pack whole examples")
        self.example_row = lowest
        first = torch.full((rows,), examples, device=ids.device).scatter_reduce(0, owners, ids, "amin")
        self.example_slot = torch.arange(examples, device=ids.device) - first[self.example_row]
        self.slots = int(self.example_slot.max()) + 1 if examples else 0
        self.token_slot = torch.where(real, segment_ids - first[:, None], -1)  # (rows, seq)
        self.rows = rows

    def soft_tokens(self, generator, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft tokens (rows, slots * n_soft, d) of every example from its own prompt, and which
        of them each token sees (rows, seq, slots * n_soft)."""
        index, valid = self.index.to(hidden.device), self.valid.to(hidden.device)
        prompts = hidden.flatten(0, 1)[index]  # (examples, width, d): each example's prompt tokens
        own = generator(prompts.float(), valid).to(hidden.dtype)  # (examples, n_soft, d)
        n_soft = own.shape[1]
        soft = own.new_zeros(self.rows, self.slots, n_soft, own.shape[-1])
        soft = soft.index_put((self.example_row.to(hidden.device), self.example_slot.to(hidden.device)), own)
        column_slot = torch.arange(self.slots * n_soft, device=hidden.device) // n_soft
        visible = self.token_slot.to(hidden.device)[..., None] == column_slot
        return soft.flatten(1, 2), visible
