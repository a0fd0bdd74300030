"""The quality benchmarks' tables in Markdown: one per task (learning-curve summary, test metrics,
the zero-shot backbone as a row) and the learning-rate sweep's."""

from __future__ import annotations

import math
import statistics

from . import curves
from .methods import knob_text

ZERO_SHOT = "backbone, no adapter (zero-shot)"


def spread(values: list[float]) -> str:
    """`mean ± sd` over seeds (the mean alone for one)."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def number(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def task_summary(runs: dict[str, list[dict]], fraction: float):
    """(threshold, {label: curves.Summary}, {label: seed-mean curve}) of one task's runs."""
    means = {label: curves.mean_curve([r["curve"] for r in rs]) for label, rs in runs.items() if rs}
    threshold, summaries = curves.summarize(means, fraction)
    return threshold, summaries, means


def task_table(task: str, runs: dict[str, list[dict]], sizes: dict, zero: dict, test_columns: list[tuple[str, str]],
               metric: str, fraction: float = 0.9) -> list[str]:
    """One task's table: per method its knob, trainable parameters and lr; on the seeds' mean dev
    curve the final and best metric, the step and the training seconds at which it first reaches
    `fraction` of the best final metric of all methods, and what it still gained over the last
    quarter of the steps; then the test columns (header, summary key) as mean ± sd and per seed,
    and the training seconds of a run. `runs`: label -> the runs that finished."""
    threshold, summaries, _ = task_summary(runs, fraction)
    pct = f"{fraction:.0%}"
    head = (f"| method | knob | trainable | lr | final {metric} | best (step) | steps to {pct} | train s to {pct} "
            f"| last-quarter gain |")
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    for header, _ in test_columns:
        head += f" {header} |"
        rule += "---:|"
    head += " per seed | train s |"
    rule += "---|---:|"
    lines = [head, rule]
    row = f"| {ZERO_SHOT} | - | 0 | - | - | - | - | - | - |"
    for _, key in test_columns:
        row += f" {number(zero.get(key))} |"
    lines.append(row + " - | - |")
    for label, rs in runs.items():
        knob, n = sizes[label]
        if not rs:
            lines.append(f"| {label} | {knob_text(label, knob)} | {n:,} | - | failed: see below |" + " - |" *
                         (6 + len(test_columns)))
            continue
        s = summaries[label]
        best = "-" if s.best is None else f"{s.best:.1f} ({s.best_step})"
        row = (f"| {label} | {knob_text(label, knob)} | {n:,} | {rs[0]['lr']:g} | {number(s.final)} | {best} | "
               f"{number(s.reach_step, 'd') if s.reach_step is not None else 'not reached'} | "
               f"{number(s.reach_seconds, '.0f')} | {number(s.late_gain, '+.1f')} |")
        for _, key in test_columns:
            row += f" {spread([r[key] for r in rs if r.get(key) is not None])} |"
        first = test_columns[0][1]
        row += (f" {' / '.join(number(r.get(first)) for r in rs)} | "
                f"{statistics.fmean(r['train_seconds'] for r in rs):.0f} |")
        lines.append(row)
    lines += ["", f"Threshold: {pct} of the best final {metric}, {threshold:.1f}." if threshold is not None else
              f"No threshold: no method's final dev {metric} is above 0."]
    return lines


def failures(failed: list[tuple[tuple, str]]) -> list[str]:
    """Lines naming the runs that failed (job, error), for under the tables."""
    if not failed:
        return []
    lines = ["Runs that failed (left out of the curves and tables):", ""]
    for (task, label, seed, lr), error in failed:
        lines.append(f"- {task}, {label}, seed {seed}, lr {lr:g}: {error}")
    return lines + [""]


def pick_lr(dev: dict, tasks: list[str], label: str, lrs: list[float]) -> float:
    """The rate with the lowest geometric mean of dev losses over the tasks (tasks differ in loss
    scale); a failed or diverged run counts as infinite loss."""
    def score(lr):
        losses = [dev.get((t, label, lr), math.inf) for t in tasks]
        return math.inf if any(not math.isfinite(x) or x <= 0 for x in losses) else \
            statistics.fmean(math.log(x) for x in losses)
    return min(lrs, key=score)


def lr_table(dev: dict, tasks: list[str], labels: list[str], lrs: list[float], picks: dict) -> list[str]:
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | pick |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for label in labels:
        cells = [" / ".join(number(dev.get((t, label, lr)), ".3f") for t in tasks) for lr in lrs]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {picks[label]:g} |")
    return lines + ["", f"Dev losses per cell: {' / '.join(tasks)} (-: the run failed or diverged)."]
