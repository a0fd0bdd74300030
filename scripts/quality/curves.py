"""Learning curves: read from a run folder, averaged over seeds, summarized. Pure functions but
`load_curve`, which reads the trainer's metrics.jsonl and our timing.jsonl.

A curve is a list of points, one per evaluation, in step order:
{"step", "seconds" (training seconds so far, evaluations left out), "metric" (the task metric
on the dev set, or None), "dev_loss"}.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from peftrun.train.curves import read_events  # the trainer's reader of its .jsonl logs


def load_curve(run_dir: Path, metric: str) -> list[dict]:
    """The run's evaluations (metrics.jsonl) joined by step with its timings (timing.jsonl)."""
    seconds = {r["step"]: r["train_seconds"] for r in read_events(Path(run_dir) / "timing.jsonl")}
    points = {}
    for e in read_events(Path(run_dir) / "metrics.jsonl"):
        if e.get("event") == "eval":  # a resumed run wrote the log again from its checkpoint on
            points[e["step"]] = {"step": e["step"], "seconds": seconds.get(e["step"]),
                                 "metric": e.get(f"dev_{metric}"), "dev_loss": e.get("dev_loss")}
    return [points[s] for s in sorted(points)]


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The seeds' mean at the steps every seed evaluated, with the lowest and highest metric
    (`low`, `high`) for a band."""
    if not curves:
        return []
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in curves)))
    by_step = [{p["step"]: p for p in c} for c in curves]
    out = []
    for s in steps:
        points = [c[s] for c in by_step]
        metrics = [p["metric"] for p in points if p["metric"] is not None]
        out.append({"step": s, "seconds": _mean(p["seconds"] for p in points), "metric": _mean(metrics),
                    "dev_loss": _mean(p["dev_loss"] for p in points),
                    "low": min(metrics) if metrics else None, "high": max(metrics) if metrics else None})
    return out


def first_reaching(curve: list[dict], threshold: float) -> dict | None:
    """The first point whose metric is at least `threshold` (None: never)."""
    return next((p for p in curve if p["metric"] is not None and p["metric"] >= threshold), None)


def late_gain(curve: list[dict], tail: float = 0.25) -> float | None:
    """How much the metric still rose over the last `tail` of the steps: the final value minus the
    value at the last evaluation at or before (1 - tail) of the last step. Near 0 (or below):
    a plateau; well above: the budget cut the curve short."""
    points = [p for p in curve if p["metric"] is not None]
    if len(points) < 2:
        return None
    cut = (1 - tail) * points[-1]["step"]
    earlier = [p for p in points if p["step"] <= cut]
    return points[-1]["metric"] - (earlier[-1] if earlier else points[0])["metric"]


@dataclass
class Summary:
    final: float | None  # the metric at the last evaluation
    best: float | None  # the highest metric of the curve
    best_step: int | None
    reach_step: int | None  # the first step at or above the threshold (None: never)
    reach_seconds: float | None  # the training seconds to that step
    late_gain: float | None


def summarize(curves: dict[str, list[dict]], fraction: float = 0.9) -> tuple[float | None, dict[str, Summary]]:
    """Per label (a method's seed-mean curve): final and best metric, and the step and the training
    seconds at which it first reaches `fraction` of the best final metric of all labels (the
    threshold, returned first; None when no curve has a metric above 0)."""
    finals = {label: next((p["metric"] for p in reversed(c) if p["metric"] is not None), None)
              for label, c in curves.items()}
    known = [v for v in finals.values() if v is not None]
    threshold = fraction * max(known) if known and max(known) > 0 else None  # none learned: nothing to reach
    out = {}
    for label, curve in curves.items():
        points = [p for p in curve if p["metric"] is not None]
        top = max(points, key=lambda p: p["metric"], default=None)
        reached = first_reaching(points, threshold) if threshold is not None else None
        out[label] = Summary(final=finals[label], best=top["metric"] if top else None,
                             best_step=top["step"] if top else None,
                             reach_step=reached["step"] if reached else None,
                             reach_seconds=reached["seconds"] if reached else None, late_gain=late_gain(points))
    return threshold, out
