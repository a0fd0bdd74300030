"""One table over a sweep's jobs (`peftrun -m ...`): a Hydra callback (registered in
peftrun/conf/config.yaml under hydra.callbacks) that, when the sweep ends, writes
sweep_summary.md, sweep_summary.csv and sweep_summary.png (the primary metric per job) into the
sweep folder.

Everything is read from the jobs' folders on disk, never from the launcher's in-memory returns:
with submitit (hydra/launcher=local|slurm) `on_multirun_end` runs in the submitting process once
the jobs ended elsewhere. A job that finished has summary.json; one that failed has error.txt
(its one-line reason, written by the run); one with neither was killed, timed out or is still
running, and its submitit log, where there is one, gives the reason.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

SUMMARY, ERROR = "summary.json", "error.txt"
# The outcome of the last sweep summarized in this process (the command line's exit status reads it).
last_sweep: dict[str, Any] | None = None


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global last_sweep
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            jobs = expected_jobs(config)
        except Exception:  # noqa: BLE001  (another sweeper: list the folders there)
            jobs = found_jobs(sweep_dir)
        rows = [job_row(sweep_dir, num, overrides, folder) for num, overrides, folder in jobs]
        written = write_sweep_summary(sweep_dir, rows)
        failed = [r for r in rows if r["status"] != "ok"]
        last_sweep = {"dir": str(sweep_dir), "jobs": len(rows), "failed": len(failed), "files": [str(p) for p in written]}
        print(f"peftrun: sweep of {len(rows)} jobs ({len(rows) - len(failed)} finished, {len(failed)} not): "
              f"{written[0]}", flush=True)


# ------------------------------------------------------------------------------ the jobs
def expected_jobs(config: DictConfig) -> list[tuple[int, list[str], Path]]:
    """(number, overrides, folder) of every job of the sweep, as Hydra's basic sweeper expands
    the command line and names each job's folder (hydra.sweep.dir / hydra.sweep.subdir)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    given = [f"{k}={v}" for k, v in params.items()] + given
    (lines,) = BasicSweeper.split_arguments(parser.parse_overrides(given), None)
    naming = config.hydra.job.config.override_dirname
    sweep_dir = Path(str(config.hydra.sweep.dir))
    jobs = []
    for num, line in enumerate(lines):
        job = copy.deepcopy(config)
        with read_write(job), open_dict(job):
            job.hydra.job.override_dirname = get_overrides_dirname(
                parser.parse_overrides(line), exclude_keys=list(naming.exclude_keys),
                item_sep=naming.item_sep, kv_sep=naming.kv_sep)
            job.hydra.job.num = num
            job.hydra.job.id = str(num)
        jobs.append((num, list(line), sweep_dir / str(job.hydra.sweep.subdir)))
    return jobs


def found_jobs(sweep_dir: Path) -> list[tuple[int, list[str], Path]]:
    """The job folders under `sweep_dir` (those a run wrote), with the overrides their names spell."""
    folders = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and any((p / f).exists() for f in (SUMMARY, ERROR, "config.yaml")))
    return [(i, p.name.split(","), p) for i, p in enumerate(folders)]


def job_row(sweep_dir: Path, num: int, overrides: list[str], folder: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"job": num, "folder": str(folder.relative_to(sweep_dir)) if folder.is_relative_to(sweep_dir)
                           else str(folder), "overrides": overrides, "summary": {}, "reason": ""}
    if (folder / SUMMARY).exists():
        try:
            row["summary"] = json.loads((folder / SUMMARY).read_text())
            row["status"] = "ok"
            return row
        except ValueError:
            row["status"], row["reason"] = "failed", f"{SUMMARY} does not parse"
            return row
    row["status"] = "failed"
    if (folder / ERROR).exists():
        lines = [line for line in (folder / ERROR).read_text().splitlines() if line.strip()]
        row["reason"] = lines[0].strip() if lines else "failed (empty error.txt)"
    else:
        row["reason"] = log_reason(sweep_dir, folder) or (
            "no summary.json or error.txt: killed, timed out or still running" if folder.exists()
            else "the job left no folder")
    return row


def log_reason(sweep_dir: Path, folder: Path) -> str:
    """The last error line of the submitit log of the job that ran in `folder`, if any (the
    run prints its folder when it starts)."""
    logs = sweep_dir / ".submitit"
    if not logs.is_dir():
        return ""
    needle = f"run folder {folder.absolute()}"
    for out in sorted(logs.rglob("*_log.out")):
        try:
            if needle not in out.read_text(errors="replace"):
                continue
            err = out.with_name(out.name.removesuffix(".out") + ".err").read_text(errors="replace")
        except OSError:
            continue
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        marked = [line for line in lines if "error" in line.lower() or "killed" in line.lower()]
        reason = (marked or lines or [""])[-1].removeprefix("peftrun: error: ")
        return reason.removeprefix(f"job {folder.name}: ")[:300]
    return ""


# ------------------------------------------------------------------------------ the table
def _value(key: str) -> str:
    return key.split("=", 1)[1] if "=" in key else key


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]], str | None]:
    """(header, rows, primary metric): the overrides that differ between jobs, then status,
    steps, losses, test metrics (the primary one first), tokens/s and time."""
    keys = list(dict.fromkeys(o.split("=", 1)[0] for r in rows for o in r["overrides"]))
    values = {k: [dict(o.split("=", 1) if "=" in o else (o, "") for o in r["overrides"]).get(k, "")
                  for r in rows] for k in keys}
    varying = [k for k in keys if len(set(values[k])) > 1] or keys[:1]
    summaries = [r["summary"] for r in rows if r["status"] == "ok"]
    primary = next((s.get("primary_metric") for s in summaries if s.get("primary_metric")), None)
    metrics = list(dict.fromkeys(k for s in summaries for k in s if k.startswith("test_")
                                 and isinstance(s[k], (int, float))))
    if primary in metrics:
        metrics.remove(primary)
        metrics.insert(0, primary)
    header = ["job", *varying, "status", "steps", "train_loss", "dev_loss", *metrics, "tokens_per_second",
              "train_seconds", "folder"]
    body = []
    for i, r in enumerate(rows):
        s = r["summary"]
        body.append([r["job"], *[values[k][i] for k in varying], r["status"], s.get("steps"), s.get("train_loss"),
                     s.get("dev_loss"), *[s.get(m) for m in metrics], s.get("tokens_per_second"),
                     s.get("train_seconds"), r["folder"]])
    return header, body, primary


def _cell(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if column == "train_seconds":
            return f"{value:.1f}"
        if column == "tokens_per_second":
            return f"{value:,.0f}"
        return f"{value:.4f}" if column.endswith("loss") else f"{value:.2f}"
    return str(value)


def write_sweep_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """sweep_summary.md, .csv and .png in `sweep_dir`; returns their paths."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    header, body, primary = table(rows)
    shown = header[:-1]  # the folder is in the CSV (and below, for a failed job)
    md = [f"# Sweep summary: {sweep_dir}", "",
          f"{len(rows)} jobs: {sum(r['status'] == 'ok' for r in rows)} finished, "
          f"{sum(r['status'] != 'ok' for r in rows)} failed or unfinished"
          + (f"; primary metric `{primary}`" if primary else "") + ".", "",
          "| " + " | ".join(h.replace("|", "\\|") for h in shown) + " |",
          "|" + "---|" * len(shown)]
    for line in body:
        md.append("| " + " | ".join(_cell(v, h).replace("|", "\\|") for v, h in zip(line, shown)) + " |")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        md += ["", "## Failed or unfinished jobs", ""]
        md += [f"- job {r['job']} (`{r['folder']}`): {r['reason']}" for r in failed]
    paths = [sweep_dir / "sweep_summary.md", sweep_dir / "sweep_summary.csv", sweep_dir / "sweep_summary.png"]
    paths[0].write_text("\n".join(md) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*header, "error"])
    for line, r in zip(body, rows):
        writer.writerow([*("" if v is None else v for v in line), r["reason"]])
    paths[1].write_text(buffer.getvalue())
    plot_primary(paths[2], header, body, primary)
    return paths


def plot_primary(path: Path, header: list[str], body: list[list[Any]], primary: str | None) -> None:
    """A bar per job: its primary metric (failed jobs marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    varying = header[1 : header.index("status")]
    labels = [", ".join(f"{k}={v}" for k, v in zip(varying, line[1 : 1 + len(varying)])) or str(line[0])
              for line in body]
    column = header.index(primary) if primary in header else None
    values = [line[column] if column is not None and isinstance(line[column], (int, float)) else None for line in body]
    fig = Figure(figsize=(max(6.0, 0.9 * len(body) + 2), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = list(range(len(body)))
    ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], color="tab:blue")
    for x, v, line in zip(xs, values, body):
        status = line[header.index("status")]
        ax.text(x, v if v is not None else 0, f"{v:.2f}" if v is not None else status,
                ha="center", va="bottom", fontsize=8, color="black" if v is not None else "tab:red")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(primary or "no finished job")
    ax.set_title("sweep: " + (primary or "no primary metric") + " per job", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
