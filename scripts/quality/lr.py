"""Learning rates: the sweep that picks them and the committed file that keeps the picks
(`lr_picks.json`, beside this module), which the benchmarks read so that the sweep need not run
every time. Per backbone (the model option's name) and method: the rate and how it was picked."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

from . import report
from .runs import Plan, run_all

PICKS = Path(__file__).with_name("lr_picks.json")


def load_picks(backbone: str, path: Path = PICKS) -> dict[str, dict]:
    """label -> {"lr", "how"} for the backbone ({} where the file has none)."""
    path = Path(path)
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get(backbone, {})


def learning_rates(backbone: str, labels: list[str], overrides: dict[str, float], path: Path = PICKS,
                   fallback: float | None = None) -> dict:
    """label -> lr: `overrides` (--lr) first, then the picks file, then `fallback` (smoke runs). A
    method with none is an error naming the ways to give it one."""
    picks = load_picks(backbone, path)
    if fallback is not None:
        picks = {label: picks.get(label, {"lr": fallback}) for label in labels}
    missing = [label for label in labels if label not in overrides and label not in picks]
    if missing:
        raise SystemExit(f"no learning rate for {', '.join(missing)} on {backbone} in {path}: run the sweep "
                         f"(--sweep-lr LR,LR,...) or give one with --lr METHOD=LR")
    return {label: overrides.get(label, picks.get(label, {}).get("lr")) for label in labels}


def save_picks(backbone: str, picks: dict[str, float], how: str, path: Path = PICKS) -> None:
    """Record the sweep's picks for these methods (the backbone's other methods keep theirs)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = data.setdefault(backbone, {})
    for label, lr in picks.items():
        entry[label] = {"lr": lr, "how": how}
    data[backbone] = dict(sorted(entry.items()))
    path.write_text(json.dumps(data, indent=2) + "\n")


def sweep(plan: Plan, tasks: list[str], labels: list[str], lrs: list[float], seed: int, runs_root: Path,
          progress=print) -> tuple[dict, dict, list]:
    """Each method at each rate on each task (one seed, dev loss at the last step only): the dev
    losses {(task, label, lr): loss}, the picks {label: lr} (`report.pick_lr`) and the failed runs."""
    jobs = [(task, label, seed, lr) for task in tasks for label in labels for lr in lrs]
    dev, failed = {}, []
    for job, s in run_all(plan, jobs, runs_root):
        if "error" in s:
            failed.append((job, s["error"]))
            dev[job[0], job[1], job[3]] = math.inf
            progress(f"{job[0]}: {job[1]:18s} lr {job[3]:g}: failed: {s['error']}")
            continue
        dev[job[0], job[1], job[3]] = s["dev_loss"]
        progress(f"{job[0]}: {job[1]:18s} lr {job[3]:g}: dev loss {s['dev_loss']:.3f}")
    picks = {label: report.pick_lr(dev, tasks, label, lrs) for label in labels}
    return dev, picks, failed


def how_text(tasks: list[str], plan: Plan, seed: int, lrs: list[float]) -> str:
    steps = ", ".join(f"{t} {plan.steps[t]}" for t in tasks)
    return (f"lowest geometric-mean dev loss of lr {', '.join(f'{x:g}' for x in lrs)} after {steps} steps, "
            f"seed {seed}, batch {plan.batch} ({datetime.date.today().isoformat()})")
