"""What every task provides: (prompt, target) examples and a scorer for generated text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Protocol, TypeVar, runtime_checkable

from peftrun.errors import ConfigError

SPLITS = ("train", "dev", "test")
T = TypeVar("T")


@dataclass
class Example:
    """One generation example: the model reads `prompt` and should produce `target`."""

    prompt: str
    target: str
    # Every acceptable answer, for scoring; None means just [target].
    references: list[str] | None = None
    id: str = ""
    # A conversation (task=chat): its rendered text as consecutive pieces, each with whether the
    # loss covers it (assistant replies, closed as the chat template closes them); `prompt` and
    # `target` are then its last trained reply and the text before it (for generation, scoring).
    segments: list[tuple[str, bool]] | None = None
    turns_dropped: int = 0  # leading turns the task left out so the conversation fits

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


def bind_tokenizer(task: Task, tokenizer) -> None:
    """Hand the run's tokenizer to a task that renders through it (a chat template:
    `use_tokenizer(tokenizer)`, which may raise a ConfigError); the others need none. Called
    after `validate()` and before `examples()`."""
    use = getattr(task, "use_tokenizer", None)
    if use is not None:
        use(tokenizer)


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


def check_counts(cfg) -> None:
    """The split sizes of a generated task: counts >= 0."""
    for key in ("num_train", "num_dev", "num_test"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"task.{key}", f"is {getattr(cfg, key)}; use a count >= 0")


def distinct(draw: Callable[[], T], count: int, key: Callable[[T], Hashable] = lambda x: x) -> list[T]:
    """`count` draws with distinct keys, in drawing order (so a shorter request is a prefix of a
    longer one). The caller makes sure enough distinct values exist."""
    seen: set = set()
    out: list[T] = []
    while len(out) < count:
        item = draw()
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


def generated_splits(examples: list[Example], cfg, prefix: str) -> dict[str, list[Example]]:
    """Cut one stream of distinct generated examples into test, dev, then train (in that order,
    so changing num_train never changes dev or test) and give each its id."""
    splits, start = {}, 0
    for split in ("test", "dev", "train"):
        size = getattr(cfg, f"num_{split}")
        splits[split] = examples[start:start + size]
        start += size
        for k, ex in enumerate(splits[split]):
            ex.id = f"{prefix}-{split}-{k}"
    return splits


class BuiltOnce:
    """`examples(split)` for a task that builds its three splits together (`_build`), on first
    use, and serves them capped by max_train_samples / max_eval_samples."""

    cfg: Any
    _splits: Optional[dict[str, list[Example]]] = None

    def _build(self) -> dict[str, list[Example]]:
        raise NotImplementedError

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        if self._splits is None:
            self._splits = self._build()
        return cap(self._splits[split], split, self.cfg)
