"""Callbacks: small objects the loop calls with one state object. Every hook is optional."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from rich.console import Console

from .state import Run, TrainState

__all__ = ["Callback", "Checkpointer", "EarlyStopping", "MetricsLog", "Progress", "Run", "TrainState", "fire"]


class Callback(Protocol):
    """Any subset of these hooks; the loop skips the ones a callback lacks."""

    def on_train_start(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_evaluate(self, state: TrainState) -> None: ...
    def on_save(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...


def fire(callbacks: list[Any], hook: str, state: TrainState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


class EarlyStopping:
    """Tracks the best dev loss; stops after `patience` evaluations without improvement."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_evaluate(self, state: TrainState) -> None:
        state.is_best = state.dev_loss < state.best_dev_loss
        if state.is_best:
            state.best_dev_loss, state.best_step, state.bad_evals = state.dev_loss, state.step, 0
        else:
            state.bad_evals += 1
            if self.patience and state.bad_evals >= self.patience:
                state.should_stop = True


class MetricsLog:
    """Appends one JSON object per event to `metrics.jsonl`; on resume, drops the entries
    written after the checkpoint (and the final test entry) so the log reads like an
    uninterrupted run."""

    def __init__(self, path: Path, every: int, enabled: bool = True):
        self.path = path
        self.every = max(every, 1)
        self.enabled = enabled  # the main process writes; the others keep quiet

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, state: TrainState) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= state.step
            and json.loads(line).get("event") != "test"  # written again at the end
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_step_end(self, state: TrainState) -> None:
        # What the run computes only (no timings): a resumed run writes the same file.
        if state.step % self.every == 0 or state.step == state.total_steps:
            self.write({"event": "train", "step": state.step, "epoch": round(state.epoch, 4),
                        "loss": state.train_loss, "lr": current_lr(state), "grad_norm": state.grad_norm})

    def on_evaluate(self, state: TrainState) -> None:
        # Generation metrics only where this evaluation measured them (trainer.generate_every).
        fresh = state.metrics if state.metrics_step == state.step else {}
        self.write({"event": "eval", "step": state.step, "dev_loss": state.dev_loss,
                    "best_dev_loss": state.best_dev_loss, **{f"dev_{k}": v for k, v in fresh.items()}})


class Rate:
    """Tokens per second between two calls (the first: since the run started or resumed)."""

    def __init__(self, state: TrainState):
        self.tokens, self.seconds = state.tokens_seen, state.train_seconds

    def tokens_per_second(self, state: TrainState) -> float:
        tokens, seconds = state.tokens_seen - self.tokens, state.train_seconds - self.seconds
        self.tokens, self.seconds = state.tokens_seen, state.train_seconds
        return tokens / seconds if seconds > 0 else 0.0


def current_lr(state: TrainState) -> float | None:
    return state.run.scheduler.get_last_lr()[0] if state.run is not None else None


def format_metrics(metrics: dict[str, float]) -> str:
    """`exact_match 85.00, exact_match[op=max] 90.00`: names as the summary and metrics.jsonl spell them."""
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """What a person watching the run reads, from the main process (`console` is quiet on the
    others). `live` (trainer.progress): on a terminal, a rich bar over the optimizer steps and one
    over each generation; without one (a file, a SLURM log), a plain line every `every` steps —
    step/total, loss, lr, gradient norm, tokens/s, time left — and, while generating, a line
    every 30 s and one when the test set is done. Every evaluation prints one line, live or not:
    the dev loss, the best so far and the dev metrics it measured."""

    def __init__(self, live: bool, console: Console | None = None, every: int = 10):
        self.live = live
        self.console = console or Console(highlight=False)
        self.every = max(every, 1)
        self.interactive = self.console.is_terminal and not self.console.is_dumb_terminal
        self.bar = None

    def print(self, line: str) -> None:
        # Plain text (metric names hold brackets, not markup), one line however wide.
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def on_train_start(self, state: TrainState) -> None:
        self.rate = Rate(state)
        self.start_step, self.start_seconds = state.step, state.train_seconds
        if not (self.live and self.interactive):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), transient=False,
                       console=self.console)
        self.bar.start()
        self.task = self.bar.add_task("train", total=state.total_steps, completed=state.step, loss="loss -")

    def time_left(self, state: TrainState) -> float:
        steps, seconds = state.step - self.start_step, state.train_seconds - self.start_seconds
        return seconds / steps * (state.total_steps - state.step) if steps > 0 else math.nan

    def on_step_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.step, loss=f"loss {state.train_loss:.4f}")
        elif self.live and (state.step % self.every == 0 or state.step == state.total_steps):
            lr = current_lr(state)
            self.print(f"step {state.step}/{state.total_steps}  loss {state.train_loss:.4f}"
                       + (f"  lr {lr:.3g}" if lr is not None else "")
                       + f"  grad norm {state.grad_norm:.3g}  {self.rate.tokens_per_second(state):,.0f} tokens/s"
                       + f"  {format_duration(self.time_left(state))} left")

    def on_evaluate(self, state: TrainState) -> None:
        best = "new best" if state.is_best else (f"best {state.best_dev_loss:.4f} at step {state.best_step}"
                                                  if state.best_step >= 0 else "no best yet")
        fresh = state.metrics if state.metrics_step == state.step else {}
        metrics = f"; dev {format_metrics(fresh)}" if fresh else ""
        self.print(f"eval step {state.step}/{state.total_steps}: dev loss {state.dev_loss:.4f} ({best}){metrics}")

    @contextmanager
    def generation(self, split: str, total: int) -> Iterator[Callable[[int], None]]:
        """A display over generating `total` prompts of `split`; yields `advance(n)`."""
        label, started = f"{split} generation", time.perf_counter()
        if not self.live:
            yield lambda n: None
            return
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            bar = self.bar or Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), transient=True,
                                  console=self.console)
            own = bar is not self.bar
            if own:
                bar.start()
            task = bar.add_task(label, total=total, loss="prompts")
            try:
                yield lambda n: bar.advance(task, n)
            finally:
                bar.remove_task(task)
                if own:
                    bar.stop()
            return
        # No terminal: a line every 30 s while it lasts, and one when the test set is done.
        done, said = [0], [started]

        def advance(n: int) -> None:
            done[0] += n
            now = time.perf_counter()
            if done[0] < total and now - said[0] >= 30:
                said[0] = now
                self.print(f"{label}: {done[0]}/{total} prompts, {format_duration(now - started)}")

        yield advance
        if split == "test":
            self.print(f"{label}: {total} prompts in {format_duration(time.perf_counter() - started)}")

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class Checkpointer:
    """Periodic checkpoints (every `every` steps and at the last step) and the best adapter
    (whenever the dev loss improves). Runs after the other callbacks of a step, so a
    checkpoint holds everything that step changed."""

    def __init__(self, every: int, keep: int):
        self.every = every
        self.keep = keep

    def on_evaluate(self, state: TrainState) -> None:
        from ..methods import save_adapter
        from .checkpoint import check_finite_tensors

        if state.is_best:
            tensors = state.run.adapter.state_dict()  # every process: sharded tensors are gathered
            check_finite_tensors(tensors, state.run.cfg, state.step, "adapter", state.run.run_dir)
            if state.run.accelerator.is_main_process:
                save_adapter(state.run.adapter, state.run.run_dir / "best",
                             {"step": state.step, "dev_loss": state.dev_loss}, tensors=tensors)
        state.run.accelerator.wait_for_everyone()

    def on_step_end(self, state: TrainState) -> None:
        from .checkpoint import save_checkpoint

        due = self.every > 0 and state.step % self.every == 0
        if due or state.step >= state.total_steps or state.should_stop or state.preempted:
            save_checkpoint(state.run.run_dir, state, state.run, keep=self.keep)
            fire([c for c in state.run.callbacks if c is not self], "on_save", state)
