"""The closing report of a run: the summary table and the figures it shows."""

from __future__ import annotations

import resource
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux: KiB)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="peftrun summary", show_header=False)
    memory = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    rows = [
        ("method", summary["method"]),
        ("trainable parameters", f"{summary['trainable_params']:,}"),
        ("steps", str(summary["steps"])),
        ("train loss", f"{summary['train_loss']:.4f}"),
        ("dev loss", f"{summary['dev_loss']:.4f}"),
        *[(metric_label(k.removeprefix("test_")) + " (test)", f"{v:.2f}")
          for k, v in summary.items() if k.startswith("test_") and isinstance(v, float)],
        ("tokens/s (train)", f"{summary['tokens_per_second']:,.0f}"),
        (memory, f"{summary['peak_memory_mb']:,.0f} MiB"),
        ("adapter", summary["adapter_dir"]),
    ]
    for key, value in rows:
        table.add_row(escape(key), escape(value))  # `[op=max]` is text, not rich markup
    return table


def metric_label(name: str) -> str:
    """`exact match` for `exact_match`; a per-group metric keeps its group as written:
    `exact match [op=max]` for `exact_match[op=max]` (the `max` operation, not a maximum)."""
    base, bracket, group = name.partition("[")
    return base.replace("_", " ") + (f" [{group}" if bracket else "")
