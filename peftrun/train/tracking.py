"""Experiment trackers (trainer.report_to: tensorboard, wandb, mlflow, ...) through Accelerate's
tracking API, as a callback: the resolved config at the start, then train loss, lr, gradient
norm and tokens/s every trainer.log_every steps, the dev loss and dev metrics at each
evaluation, and the final dev loss and test metrics. Only the main process writes.

Where each tracker writes (docs/monitoring.md): TensorBoard under <run>/tensorboard/; wandb under
<run>/wandb/ (WANDB_MODE=offline needs no account); MLflow to $MLFLOW_TRACKING_URI, else a file
store in <run>/mlruns/.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import tracker_names
from ..errors import ConfigError
from .callbacks import Rate, current_lr
from .state import TrainState

PROJECT = "peftrun"  # wandb's project, MLflow's experiment (unless $MLFLOW_EXPERIMENT_NAME), TensorBoard's sub-folder


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as one level of `group.key` entries with scalar values (what every
    tracker takes as hyperparameters); lists and mappings become JSON text, null "null"."""
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def tracker_key(split: str, name: str, tracker: str = "") -> str:
    """`dev/exact_match`, `test/exact_match[op=max]` (a per-group metric, as the summary spells
    it). MLflow takes letters, digits and `_-. /:` only, and a name may not also be a folder of
    another: `test/exact_match.op:max` there (`-` for `:` on Windows)."""
    key = f"{split}/{name}"
    if tracker == "mlflow":
        key = re.sub(r"\[(\w+)=(.*)\]$", r".\1:\2", key)
        key = re.sub(r"[^\w\-. /:]" if os.name != "nt" else r"[^\w\-. /]", "-", key)
    return key


class Trackers:
    """Logs the run to the trackers of trainer.report_to (a no-op without any)."""

    def __init__(self, accelerator, cfg: DictConfig, run_dir: Path, every: int):
        self.acc, self.cfg, self.run_dir = accelerator, cfg, Path(run_dir)
        self.every = max(every, 1)
        self.wanted = tracker_names(cfg.trainer) if accelerator.is_main_process else []
        self.active = False

    def log(self, split: str, values: dict[str, Any], step: int) -> None:
        """`values` (numbers only) under `split/`. A tracker that fails (a server gone, a full
        disk) is dropped with one line on stderr: it never stops the run."""
        values = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        for tracker in list(self.acc.trackers):
            try:
                tracker.log({tracker_key(split, k, tracker.name): v for k, v in values.items()}, step=step)
            except Exception as e:  # noqa: BLE001
                self.acc.trackers.remove(tracker)
                print(f"peftrun: warning: trainer.report_to: {tracker.name} failed at step {step} and is "
                      f"dropped ({type(e).__name__}: {' '.join(str(e).split())[:200]})", file=sys.stderr, flush=True)

    def on_train_start(self, state: TrainState) -> None:
        self.rate = Rate(state)
        if not self.wanted or self.active:
            return
        if "mlflow" in self.wanted:
            import mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:  # a file store in the run folder (MLflow 3 asks to opt in to it)
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = (self.run_dir / "mlruns").absolute().as_uri()
            mlflow.set_tracking_uri(uri)
        name = self.run_dir.name
        self.active = True  # from here on, finish() closes whatever started
        try:
            self.acc.init_trackers(PROJECT, config=flat_config(self.cfg), init_kwargs={
                "wandb": {"name": name, "dir": str(self.run_dir)},
                "mlflow": {"run_name": name},
            })
        except Exception as e:  # noqa: BLE001  (no login, no server, ...): before any step
            self.finish()
            hint = "; without a wandb account set WANDB_MODE=offline" if "wandb" in self.wanted else ""
            raise ConfigError("trainer.report_to", f"a tracker did not start ({type(e).__name__}: "
                                                   f"{' '.join(str(e).split())[:200]}){hint}") from e

    def on_step_end(self, state: TrainState) -> None:
        if self.active and (state.step % self.every == 0 or state.step == state.total_steps):
            self.log("train", {"loss": state.train_loss, "lr": current_lr(state), "grad_norm": state.grad_norm,
                               "tokens_per_second": self.rate.tokens_per_second(state), "epoch": state.epoch},
                     state.step)

    def on_evaluate(self, state: TrainState) -> None:
        if self.active:
            fresh = state.metrics if state.metrics_step == state.step else {}
            self.log("dev", {"loss": state.dev_loss, "best_loss": state.best_dev_loss, **fresh}, state.step)

    def on_train_end(self, state: TrainState) -> None:
        """The final dev loss and the test metrics, then the trackers close."""
        if self.active:
            self.log("test", {"dev_loss": state.dev_loss, **state.metrics}, state.step)
            self.finish()

    def finish(self) -> None:
        """Close the trackers (once; also when a run stops early). Accelerate's end_training()
        would also destroy the process group, which the run may still need."""
        if self.active:
            self.active = False
            for tracker in self.acc.trackers:
                try:
                    tracker.finish()
                except Exception:  # noqa: BLE001  (one that never started, or already failed)
                    pass
            self.acc.trackers = []
