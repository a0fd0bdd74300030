"""A run's learning curves as one PNG (curves.png in the run folder), read from metrics.jsonl:
train and dev loss, the learning rate, and the task metric where dev generation measured it
(the test value marked at the last step). Matplotlib's Agg canvas, no pyplot: no display needed
and no global state touched."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

WIDTH_IN, PANEL_IN, DPI = 8.0, 2.5, 100  # 800 px wide, 250 px per panel


def read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
    return events


def _finite(events: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(e["step"], e[key]) for e in events
             if isinstance(e.get(key), (int, float)) and math.isfinite(e[key]) and "step" in e]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _style(x: list[int]) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3} if len(x) < 40 else {}


def write_curves(metrics_path: Path, out: Path, primary_metric: str | None = None, title: str = "") -> Path:
    """Plot `metrics_path` (metrics.jsonl) into `out`; returns `out`. `primary_metric`: the task's
    metric name (e.g. `exact_match`); its per-group variants (`exact_match[op=max]`) join it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    events = read_events(Path(metrics_path))
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    test = next((e for e in reversed(events) if e.get("event") == "test"), None)
    metric_keys = [k for k in dict.fromkeys(k for e in evals for k in e) if k.startswith("dev_")
                   and k not in ("dev_loss",) and _finite(evals, k)[0]]
    if primary_metric:
        own = [k for k in metric_keys if k == f"dev_{primary_metric}" or k.startswith(f"dev_{primary_metric}[")]
        metric_keys = own or metric_keys
    panels = 3 if metric_keys else 2
    fig = Figure(figsize=(WIDTH_IN, PANEL_IN * panels), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True)

    loss = axes[0]
    for x, y, label in ((*_finite(train, "loss"), "train loss"), (*_finite(evals, "dev_loss"), "dev loss")):
        if x:
            loss.plot(x, y, label=label, **_style(x))
    values = _finite(train, "loss")[1] + _finite(evals, "dev_loss")[1]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        loss.set_yscale("log")
    loss.set_ylabel("loss")
    if values:
        loss.legend(loc="upper right", fontsize=8)
    else:
        loss.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=loss.transAxes)
    loss.set_title(title if len(title) <= 110 else title[:109] + "…", fontsize=9)

    lr = axes[1]
    x, y = _finite(train, "lr")
    if x:
        lr.plot(x, y, color="tab:green", **_style(x))
    lr.set_ylabel("learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    if metric_keys:
        metric = axes[2]
        for k in metric_keys:
            x, y = _finite(evals, k)
            main = "[" not in k
            metric.plot(x, y, label=k.removeprefix("dev_") + " (dev)", **_style(x),
                        linestyle="-" if main else "--", linewidth=1.5 if main else 0.8, alpha=1.0 if main else 0.7)
        name = metric_keys[0].removeprefix("dev_")
        if test is not None and isinstance(test.get(name), (int, float)):
            metric.plot([test["step"]], [test[name]], "*", markersize=10, color="black",
                        label=f"{name} (test)")
        metric.set_ylabel(name.split("[")[0])
        metric.legend(loc="best", fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=DPI)
    return out
