"""Callbacks: small objects the loop calls with one state object. Every hook is optional."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

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
        if state.step % self.every == 0 or state.step == state.total_steps:
            lr = state.run.scheduler.get_last_lr()[0] if state.run is not None else None
            self.write({"event": "train", "step": state.step, "epoch": round(state.epoch, 4),
                        "loss": state.train_loss, "lr": lr})

    def on_evaluate(self, state: TrainState) -> None:
        self.write({"event": "eval", "step": state.step, "dev_loss": state.dev_loss,
                    "best_dev_loss": state.best_dev_loss,
                    **{f"dev_{k}": v for k, v in state.metrics.items()}})


class Progress:
    """A rich progress bar over optimizer steps, showing the loss."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def on_train_start(self, state: TrainState) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.bar = Bar(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("train", total=state.total_steps, completed=state.step, loss="-")

    def on_step_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.step, loss=f"{state.train_loss:.4f}")

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
