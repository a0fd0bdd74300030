"""What both quality benchmarks do once their backbone, tasks and plan are set: every method on
every task and seed through the pool of runs, then per task a table and a PNG; and the
learning-rate sweep with its table and the picks file."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from . import lr as lr_module
from . import plots, report
from .runs import Plan, run_all


def elapsed(started: float) -> str:
    return f"(elapsed {(time.perf_counter() - started) / 60:.1f} min)"


def run_methods(plan: Plan, tasks: list[str], labels: list[str], seeds: list[int], lrs: dict[str, float],
                runs_root: Path, started: float, rescore=None) -> tuple[dict, list]:
    """results[task][label]: the finished runs in seed order; and the failed ones (job, error).
    `rescore(task, summary)`: more test scores for a finished run (added to its summary)."""
    jobs = [(task, label, seed, lrs[label]) for task in tasks for label in labels for seed in seeds]
    done, failed = {}, []
    for job, s in run_all(plan, jobs, runs_root):
        task, label, seed, _ = job
        if "error" in s:
            failed.append((job, s["error"]))
            print(f"{task}: {label:18s} seed {seed}: failed: {s['error']} {elapsed(started)}", flush=True)
            continue
        if rescore is not None:
            s.update(rescore(task, s))
        done[job] = s
        metric = s["primary_metric"]
        print(f"{task}: {label:18s} seed {seed}: {metric} {s[metric]:.1f}, dev loss {s['dev_loss']:.3f}, "
              f"train {s['train_seconds']:.0f} s, wall {s['wall_seconds']:.0f} s {elapsed(started)}", flush=True)
    results = {task: {label: [done[j] for j in jobs if j[:2] == (task, label) and j in done] for label in labels}
               for task in tasks}
    return results, failed


def task_sections(results: dict, zero: dict, sizes: dict, test_columns: dict, metric_names: dict, out: Path,
                  doc: Path | None, prefix: str, fraction: float = 0.9) -> list[str]:
    """Per task: a bold line, its table and its plot (out/<prefix>_<task>.png, and a copy in
    plots/ beside the page `doc`, so the page and its plots are committed together), linked
    relative to the page, else to `out`."""
    lines = []
    for task, runs in results.items():
        metric = metric_names[task]
        threshold, _, means = report.task_summary(runs, fraction)
        png = plots.plot_task(task, means, zero[task].get(test_columns[task][0][1]), threshold, metric,
                              out / f"{prefix}_{task}.png", title=f"{task}: dev {metric} (mean of seeds, range shaded)")
        if doc is not None:
            (doc.parent / "plots").mkdir(exist_ok=True)
            png = Path(shutil.copy(png, doc.parent / "plots" / png.name))
        link = os.path.relpath(png, doc.parent if doc is not None else out)
        lines += [f"**{task}** (dev {metric})", "",
                  *report.task_table(task, runs, sizes, zero[task], test_columns[task], metric, fraction), "",
                  f"![{task}: dev {metric} against steps and training seconds]({link})", ""]
    return lines


def sweep_and_record(plan: Plan, backbone: str, tasks: list[str], labels: list[str], lrs: list[float], seed: int,
                     runs_root: Path, picks_path: Path, started: float) -> list[str]:
    """The sweep; its picks into the picks file; its table (Markdown lines, no heading)."""
    dev, picks, failed = lr_module.sweep(plan, tasks, labels, lrs, seed, runs_root,
                                         progress=lambda line: print(f"{line} {elapsed(started)}", flush=True))
    how = lr_module.how_text(tasks, plan, seed, lrs)
    lr_module.save_picks(backbone, picks, how, picks_path)
    print(f"picks written into {picks_path}", flush=True)
    return [f"Learning rates: {how}; written into `{Path(picks_path).name}`, which the benchmark reads.", "",
            *report.lr_table(dev, tasks, labels, lrs, picks), "", *report.failures(failed)]
