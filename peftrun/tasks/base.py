"""What every task provides: (prompt, target) examples and a scorer for generated text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from peftrun.errors import ConfigError

SPLITS = ("train", "dev", "test")


@dataclass
class Example:
    """One generation example: the model reads `prompt` and should produce `target`."""

    prompt: str
    target: str
    # Every acceptable answer, for scoring; None means just [target].
    references: list[str] | None = None
    id: str = ""

    def __post_init__(self) -> None:
        if self.references is None:
            self.references = [self.target]


@runtime_checkable
class Task(Protocol):
    name: str
    primary_metric: str

    def validate(self) -> None:
        """Cheap checks before any weights load; raises ConfigError."""

    def examples(self, split: str) -> list[Example]:
        """`split` in SPLITS; max_train_samples caps train, max_eval_samples dev and test."""

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Metric values in 0..100, including `primary_metric`."""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def check_limits(cfg) -> None:
    """The sample caps shared by every task: null or a non-negative count."""
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(cfg, key, None)
        if value is not None and value < 0:
            raise ConfigError(f"task.{key}", f"is {value}; use null (all) or a count >= 0")


def cap(examples: list[Example], split: str, cfg) -> list[Example]:
    """Apply max_train_samples to train and max_eval_samples to dev/test (first N, in order)."""
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    return examples if limit is None else examples[:limit]
