"""Runs through peftrun's own trainer (`peftrun.train.loop.train`), in worker processes or in this
one, and the backbone's zero-shot answers.

Every run evaluates every `eval_every` steps: dev loss and, for learning curves, the task metric
on the dev set (trainer.generate_every). A callback of ours (`TimingLog`) records the training
seconds at each evaluation without the evaluations' own time, so curves against wall time do
not depend on how often the benchmark evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from . import curves
from .methods import METHODS, alora_schedule, compose, folder_name, method_overrides


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The run-folder options every quality benchmark takes: --runs, --reuse, --workers."""
    p.add_argument("--runs", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="with --runs: read the runs already finished there (an "
                   "interrupted benchmark, more tasks or methods) instead of training them again")
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one torch thread each (1: in this process)")


def check_run_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.reuse and not args.runs:
        p.error("--reuse reads the run folders of --runs: give --runs DIR")


@dataclass(frozen=True)
class Plan:
    """What the runs of one benchmark share (picklable: it goes to the worker processes)."""

    model_overrides: tuple[str, ...]
    task_overrides: dict  # task -> tuple of overrides (task=..., its files, its lengths)
    steps: dict  # task -> optimizer steps
    eval_every: dict  # task -> steps between evaluations (a divisor of the steps: one at the last)
    sizes: dict  # label -> (knob value, trainable parameters)
    batch: int = 16
    eval_batch: int = 64
    generate: bool = True  # the dev metric at every evaluation; False (the lr sweep): dev loss only
    alora_rounds: int = 3
    alora_dev_batch: int = 16
    workers: int = 2
    threads: int = 1  # torch threads per run
    reuse: bool = False  # a run whose folder holds a finished run (summary.json) is read, not trained again
    extra: tuple[str, ...] = field(default=())  # more overrides for every run


def trainer_overrides(plan: Plan, task: str, seed: int, lr: float) -> list[str]:
    """The group's protocol scaled down: AdamW, linear decay after 6% warm-up, the adapter with the
    best dev loss tested, greedy decoding."""
    steps, every = plan.steps[task], plan.eval_every[task]
    return [f"trainer.max_steps={steps}", f"trainer.lr={lr}", f"trainer.seed={seed}",
            f"trainer.micro_batch_size={plan.batch}", "trainer.grad_accum=1", f"trainer.eval_batch_size={plan.eval_batch}",
            "trainer.scheduler=linear", "trainer.warmup_ratio=0.06", f"trainer.eval_every={every}",
            f"trainer.generate_every={every if plan.generate else 0}", "trainer.early_stopping_patience=0",
            "trainer.load_best_at_end=true", "trainer.save_every=0", "trainer.save_total_limit=1",
            "trainer.progress=false", f"trainer.log_every={every}", "trainer.num_beams=1"]


def run_config(plan: Plan, job: tuple):
    task, label, seed, lr = job
    overrides = [*plan.model_overrides, *plan.task_overrides[task], *method_overrides(label, plan.sizes[label][0])]
    if METHODS[label][0] == "alora":
        overrides += alora_schedule(plan.steps[task], plan.alora_rounds, plan.alora_dev_batch)
    return compose(overrides + trainer_overrides(plan, task, seed, lr) + list(plan.extra))


class TimingLog:
    """Training seconds at each evaluation, the evaluations' own time left out, one JSON line per
    evaluation in timing.jsonl. The trainer's `train_seconds` runs on through its evaluations
    (its origin is fixed at the start), so an evaluation's length is the time since the step
    ended, which is the trainer's origin plus `train_seconds`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.eval_seconds = 0.0

    def on_train_start(self, state) -> None:
        self.origin = time.perf_counter() - state.train_seconds  # as the trainer sets its own
        kept = [r for r in curves.read_events(self.path) if r.get("step", 0) <= state.step]  # a resumed run
        self.eval_seconds = sum(r["eval_seconds"] for r in kept)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_evaluate(self, state) -> None:
        spent = time.perf_counter() - (self.origin + state.train_seconds)
        record = {"step": state.step, "train_seconds": state.train_seconds - self.eval_seconds, "eval_seconds": spent}
        self.eval_seconds += spent
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def torch_threads(n: int):
    """`n` torch threads for a run, in a worker process or in this one (restored afterwards): the
    thread count splits float sums differently, which moves the last bits of a run and, through
    them, some outcomes, so `--workers 1` must run as the workers do."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_one(plan: Plan, job: tuple, run_dir: Path) -> dict:
    """One run; its summary with the run folder, the wall seconds, the lr and the learning curve
    (`curves.load_curve`), or {"error": ...} where it failed. Its own output goes to <run_dir>.log."""
    from peftrun.train.loop import train

    finished = run_dir / "summary.json"
    if plan.reuse and finished.is_file():  # an interrupted benchmark goes on from its finished runs
        summary = json.loads(finished.read_text())
        metric = summary["primary_metric"].removeprefix("test_")
        return {**summary, "wall_seconds": math.nan, "lr": job[3], "run_dir": str(run_dir), "reused": True,
                "curve": curves.load_curve(run_dir, metric)}
    started = time.perf_counter()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_file = run_dir.parent / f"{run_dir.name}.log"
    with torch_threads(plan.threads), log_file.open("w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:  # composing too: a size or schedule the config refuses fails this run, not the benchmark
            summary = train(run_config(plan, job), run_dir, [TimingLog(run_dir / "timing.jsonl")])
        except Exception as e:  # noqa: BLE001  (a diverged lr in a sweep; the other runs go on)
            traceback.print_exc()
            reason = " ".join(str(e).split())[:300]
            return {"error": f"{type(e).__name__}: {reason} (log: {log_file})", "lr": job[3]}
    metric = summary["primary_metric"].removeprefix("test_")
    return {**summary, "wall_seconds": time.perf_counter() - started, "lr": job[3], "run_dir": str(run_dir),
            "curve": curves.load_curve(run_dir, metric)}


def run_folder(runs_root: Path, job: tuple) -> Path:
    task, label, seed, lr = job
    return Path(runs_root) / task / folder_name(label) / f"seed{seed}-lr{lr:g}"


def run_all(plan: Plan, jobs: list, runs_root: Path):
    """Yield (job, summary) as runs finish. With two workers, two one-thread runs share the two
    cores: small models keep two threads poorly busy, and on a shared machine one thread per
    process suffers least from the other jobs."""
    if plan.workers <= 1:
        for job in jobs:
            yield job, run_one(plan, job, run_folder(runs_root, job))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(plan.workers, mp_context=context) as pool:
        futures = {pool.submit(run_one, plan, job, run_folder(runs_root, job)): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def zero_shot(plan: Plan, task: str) -> dict:
    """The backbone with no adapter on the test prompts, generated as the trainer's evaluation does;
    the task's scores (`test_*`), the predictions and the wall seconds."""
    from peftrun.generate import generate
    from peftrun.models import build_model
    from peftrun.validate import Prepared

    cfg = compose([*plan.model_overrides, *plan.task_overrides[task]])
    prepared = Prepared.build(cfg)  # the task, with its tokenizer bound (a chat task renders through it)

    test = prepared.task.examples("test")
    started = time.perf_counter()
    with torch_threads(plan.threads * max(plan.workers, 1)):  # nothing else runs meanwhile
        predictions = generate(build_model(cfg.model, prepared.tokenizer), prepared.tokenizer, None,
                               [e.prompt for e in test], batch_size=plan.eval_batch,
                               max_new_tokens=cfg.task.max_new_tokens, max_prompt_length=cfg.task.max_length)
    scores = prepared.task.score(predictions, test)
    return {**{f"test_{k}": v for k, v in scores.items()}, "primary_metric": f"test_{prepared.task.primary_metric}",
            "wall_seconds": time.perf_counter() - started, "predictions": predictions}
