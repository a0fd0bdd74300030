"""Mixed-tenant batches: which adapter each batch row goes through, and the checks around it."""

from __future__ import annotations

from typing import Iterable

import torch


class RequestRows:
    """The adapter of each batch row in a mixed-tenant batch (None: the backbone alone).

    `tenants` are the distinct names in first-seen order; row i uses slot `slot[i]`: 0 for the
    backbone, 1 + the tenant's index otherwise, so per-tenant tensors stacked behind a zero slot
    can be gathered per row with one index. Beams of a request repeat its name, row by row."""

    def __init__(self, names: Iterable[str | None]):
        self.names = list(names)
        self.tenants = list(dict.fromkeys(n for n in self.names if n is not None))
        self.slot = torch.tensor([0 if n is None else 1 + self.tenants.index(n) for n in self.names])
        # One adapter for every row: the plain single-adapter path is exact and fastest.
        self.single = self.tenants[0] if len(self.tenants) == 1 and None not in self.names else None
        self._rows: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def check_batch(self, batch: int) -> None:
        if batch != len(self.names):
            raise ValueError(f"{len(self.names)} request adapters for a batch of {batch} rows; "
                             "route each batch with its own names (one per row, beams included)")

    def rows(self, name: str, device: torch.device) -> torch.Tensor:
        """Indices of the rows that use `name`, on `device` (cached)."""
        key = (name, device)
        if key not in self._rows:
            self._rows[key] = torch.tensor([i for i, n in enumerate(self.names) if n == name], device=device)
        return self._rows[key]


class Route:
    """One mixed-tenant batch as the layers of a method see it: the rows, plus whatever the
    method shares between its layers for the batch (a subclass adds that)."""

    def __init__(self, rows: RequestRows):
        self.rows = rows


def check_tenants(names: Iterable[str | None], known: Iterable[str]) -> None:
    """Refuse a request naming an adapter this backbone does not hold."""
    known = list(known)
    for name in names:
        if name is not None and name not in known:
            raise ValueError(f"no adapter named {name!r} on this model (have: {', '.join(known) or 'none'})")


def check_unmerged(layers: Iterable) -> None:
    """Refuse routing while an adapter is merged into the weights: every row would get it."""
    merged = sorted({n for layer in layers for n in layer.merged})
    if merged:
        raise ValueError(f"adapter(s) {merged} are merged into the backbone weights, so every row "
                         "would get them; unmerge them before routing requests")
