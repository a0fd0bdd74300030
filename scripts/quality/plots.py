"""One PNG per task: the dev metric against optimizer steps and against training seconds, a line
per method (the seeds' mean, their range shaded), the threshold and the zero-shot backbone as
dashed lines. Matplotlib's Agg canvas, no pyplot."""

from __future__ import annotations

from pathlib import Path

from .methods import MARKERS


def plot_task(task: str, means: dict[str, list[dict]], zero: float | None, threshold: float | None, metric: str,
              out: Path, title: str = "") -> Path:
    """`means`: label -> the seeds' mean curve (curves.mean_curve). Writes and returns `out`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for label, curve in means.items():
        points = [p for p in curve if p["metric"] is not None]
        if not points:
            continue
        style = {"marker": MARKERS.get(label, "o"), "markersize": 3.5, "linewidth": 1.4, "label": label}
        for ax, x_key in ((by_step, "step"), (by_time, "seconds")):
            pts = [p for p in points if p[x_key] is not None]
            x = [p[x_key] for p in pts]
            line, = ax.plot(x, [p["metric"] for p in pts], **style)
            if any(p["low"] != p["high"] for p in pts):
                ax.fill_between(x, [p["low"] for p in pts], [p["high"] for p in pts], color=line.get_color(),
                                alpha=0.12, linewidth=0)
    for ax in (by_step, by_time):
        if threshold is not None:
            ax.axhline(threshold, color="0.4", lw=0.8, ls=":", label="90% of the best final")
        if zero is not None:
            ax.axhline(zero, color="k", lw=0.8, ls="--", label="backbone (zero-shot, test)")
        ax.grid(True, alpha=0.3)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training seconds (evaluations left out)")
    by_step.set_ylabel(f"dev {metric}")
    by_time.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or task, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    return out
