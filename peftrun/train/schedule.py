"""What each step trains on and at which learning rate: the data order and the schedule."""

from __future__ import annotations

import math

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


class DataOrder:
    """Which training examples each optimizer step uses: a seeded permutation per epoch, cut
    into global batches. A function of the step alone, so a resumed run and a run on another
    number of processes see the same examples at the same step."""

    def __init__(self, num_examples: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = num_examples, global_batch, seed
        self.steps_per_epoch = num_examples // global_batch
        self._epoch, self._perm = -1, None

    def step_indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()
