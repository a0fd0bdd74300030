"""What each step trains on and at which learning rate: the data order and the schedule."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def lr_lambda(total: int, warmup: int, kind: str):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - warmup, 1)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


# Batches per window in which trainer.group_by_length sorts examples by length (as Hugging Face's
# LengthGroupedSampler's megabatches): wide enough to find similar lengths, narrow enough that an
# epoch's batches still mix the data.
GROUP_WINDOW = 50


class DataOrder:
    """Which training examples each optimizer step uses: a seeded permutation per epoch, cut
    into global batches. A function of the step alone, so a resumed run and a run on another
    number of processes see the same examples at the same step.

    `lengths` (trainer.group_by_length): within windows of GROUP_WINDOW global batches of the
    permutation, examples are sorted by length (longest first) and cut into global batches, whose
    order is then shuffled (same seed): each batch holds examples of similar length, sorted, so
    its micro-batches are too, and little of a padded batch is padding."""

    def __init__(self, num_examples: int, global_batch: int, seed: int, lengths: Sequence[int] | None = None):
        self.n, self.global_batch, self.seed = num_examples, global_batch, seed
        self.steps_per_epoch = num_examples // global_batch
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths), dtype=torch.long)
        if self.lengths is not None and len(self.lengths) != num_examples:
            raise ValueError(f"{len(self.lengths)} lengths for {num_examples} examples")
        self._epoch, self._perm = -1, None

    def step_indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self.epoch_order(epoch)
        return self._perm[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's examples in step order (only its first steps_per_epoch batches are used)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=generator)
        if self.lengths is None:
            return perm
        used = perm[: self.steps_per_epoch * self.global_batch]
        window = GROUP_WINDOW * self.global_batch
        grouped = []
        for start in range(0, len(used), window):
            chunk = used[start : start + window]
            # Longest first; ties keep the permutation's order (stable), so the order is seeded.
            grouped.append(chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices])
        batches = torch.cat(grouped).view(self.steps_per_epoch, self.global_batch)
        return batches[torch.randperm(self.steps_per_epoch, generator=generator)].flatten()
