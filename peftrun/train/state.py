"""What the loop hands its callbacks: the run's progress (`TrainState`, saved in every
checkpoint) and its live objects (`Run`, not saved), reached as `state.run`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from omegaconf import DictConfig
    from transformers import PreTrainedTokenizerBase

    from ..methods.base import Adapter


@dataclass
class Run:
    """The live objects of a run, handed to callbacks through `TrainState.run`."""

    cfg: DictConfig
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by the accelerator (DDP/FSDP-wrapped where it applies)
    adapter: Adapter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: PreTrainedTokenizerBase
    callbacks: list[Any]
    dev_features: list[dict[str, Any]]  # tokenized dev examples (methods that score on dev data use them)
    log: Callable[[dict[str, Any]], None]  # one JSON object into metrics.jsonl (main process)


@dataclass
class TrainState:
    """What the loop knows at a point of the run; saved in every checkpoint (`progress` part)."""

    total_steps: int
    steps_per_epoch: int
    step: int = 0
    train_loss: float = math.nan  # token-mean loss of the last optimizer step
    grad_norm: float = math.nan  # the adapter's gradient norm at the last step, before clipping
    dev_loss: float = math.nan  # of the last evaluation
    best_dev_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0  # evaluations since the best one
    metrics: dict[str, float] = field(default_factory=dict)  # last generation metrics
    metrics_step: int = -1  # the step whose dev generation measured `metrics` (-1: none yet)
    tokens_seen: int = 0
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    train_seconds: float = 0.0
    should_stop: bool = False
    is_best: bool = False  # the last evaluation improved on the best
    preempted: bool = False  # a signal asked the run to stop here (not saved: a resume goes on)
    # Live objects (not saved): set by the loop for callbacks that need them.
    run: Run | None = field(default=None, repr=False, compare=False)

    @property
    def epoch(self) -> float:
        return self.step / max(self.steps_per_epoch, 1)

    def progress(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("run", "preempted")}

    def load_progress(self, saved: dict[str, Any]) -> None:
        for key, value in saved.items():
            if hasattr(self, key) and key not in ("run", "preempted"):
                setattr(self, key, value)
