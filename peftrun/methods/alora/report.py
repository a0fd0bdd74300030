"""ALoRA's allocation shown to a person: a table per round (rich) and a heatmap at the end (PNG)."""

from __future__ import annotations

import re
from typing import Any


def layer_grid(adapter: Any) -> tuple[list[int], list[str], dict[tuple[int, str], int]]:
    """(layer indices, module kinds, open ranks per (layer, kind))."""
    grid = {}
    for m, count in adapter.allocation().items():
        match = re.search(r"\.(\d+)\.", m)
        grid[(int(match.group(1)) if match else -1, m.rsplit(".", 1)[-1])] = count
    layers = sorted({i for i, _ in grid})
    kinds = sorted({k for _, k in grid}, key=lambda k: list(dict.fromkeys(x.rsplit(".", 1)[-1] for x in adapter.layers)).index(k))
    return layers, kinds, grid


def allocation_table(adapter: Any, title: str):
    from rich.table import Table

    layers, kinds, grid = layer_grid(adapter)
    table = Table(title=title)
    table.add_column("layer", justify="right")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for i in layers:
        table.add_row(str(i), *[str(grid.get((i, k), "")) for k in kinds])
    return table


def write_heatmap(adapter: Any, path) -> None:
    """Final open ranks, layers x module kinds, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, kinds, grid = layer_grid(adapter)
    values = [[grid.get((i, k), 0) for k in kinds] for i in layers]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.0 + 0.35 * len(layers)))
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=adapter.cfg.max_rank)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    for y, row in enumerate(values):
        for x, v in enumerate(row):
            ax.text(x, y, str(v), ha="center", va="center", color="white" if v < adapter.cfg.max_rank / 2 else "black")
    fig.colorbar(image, ax=ax, label="open ranks")
    ax.set_title(f"ALoRA allocation (r_init {adapter.cfg.r_init})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


