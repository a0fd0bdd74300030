"""Offline synthetic task: an operation on a short list of digits, answered in digits.

Rendering is compact so that a character-level tokenizer gives one token per character and
no whitespace ambiguity: prompt "max 3815=", target "8"; "sort 3815=" -> "1358";
"sum 3815=" -> "17".
"""

from __future__ import annotations

import random
from typing import Callable

from peftrun.errors import ConfigError
from peftrun.tasks.base import BuiltOnce, Example, check_counts, check_limits, distinct, generated_splits
from peftrun.tasks.metrics import exact_match, mean_score

OPS: dict[str, Callable[[list[int]], str]] = {
    "max": lambda d: str(max(d)),
    "min": lambda d: str(min(d)),
    "first": lambda d: str(d[0]),
    "last": lambda d: str(d[-1]),
    "sort": lambda d: "".join(map(str, sorted(d))),
    "reverse": lambda d: "".join(map(str, reversed(d))),
    "sum": lambda d: str(sum(d)),
}


def render(op: str, digits: list[int]) -> Example:
    text = "".join(map(str, digits))
    return Example(prompt=f"{op} {text}=", target=OPS[op](digits))


class ToyTask(BuiltOnce):
    name = "toy"
    primary_metric = "exact_match"

    def __init__(self, cfg):
        self.cfg = cfg
        self.ops = list(cfg.ops)
        self.length = int(cfg.list_length)
        # Config-only checks run here so a ToyTask is never half-valid; nothing to read from disk.
        check_limits(cfg)
        if not self.ops:
            raise ConfigError("task.ops", f"is empty; pick some of {', '.join(OPS)}")
        for op in self.ops:
            if op not in OPS:
                raise ConfigError("task.ops", f"unknown op {op!r}; known ops: {', '.join(OPS)}")
        if len(set(self.ops)) != len(self.ops):
            raise ConfigError("task.ops", f"lists an op twice ({self.ops}); list each once")
        if self.length < 1:
            raise ConfigError("task.list_length", f"is {self.length}; use 1 or more digits")
        check_counts(cfg)
        space = len(self.ops) * 10**self.length
        if cfg.num_train + cfg.num_dev + cfg.num_test > space:
            raise ConfigError(
                "task.num_train",
                f"num_train + num_dev + num_test = {cfg.num_train + cfg.num_dev + cfg.num_test}"
                f" but only {space} distinct prompts exist for ops {self.ops} with list_length "
                f"{self.length}; lower the split sizes, or raise task.list_length or add ops",
            )

    def validate(self) -> None:
        pass  # everything was checked in __init__

    def _build(self) -> dict[str, list[Example]]:
        cfg, n = self.cfg, 10**self.length
        space = len(self.ops) * n
        total = cfg.num_test + cfg.num_dev + cfg.num_train
        rng = random.Random(cfg.seed)
        # Distinct indices drawn one at a time form a stable prefix. When most of the space is
        # wanted, rejection would crawl, so shuffle the whole (then small) space instead.
        if total <= space // 2:
            order = distinct(lambda: rng.randrange(space), total)
        else:
            order = list(range(space))
            rng.shuffle(order)
            order = order[:total]
        examples = [render(self.ops[i // n], [int(c) for c in str(i % n).zfill(self.length)]) for i in order]
        return generated_splits(examples, cfg, "toy")

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        refs = [ex.references for ex in examples]
        out = {"exact_match": mean_score(exact_match, predictions, refs)}
        if len(self.ops) > 1:  # per-op breakdown: which operation the model has not learned yet
            for op in self.ops:
                idx = [i for i, ex in enumerate(examples) if ex.prompt.startswith(op + " ")]
                if idx:  # `exact_match[op=max]`: the metric over one group, never read as an operation
                    out[f"exact_match[op={op}]"] = mean_score(
                        exact_match, [predictions[i] for i in idx], [refs[i] for i in idx]
                    )
        return out
