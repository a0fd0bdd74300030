"""Offline synthetic task: an operation on a short list of digits, answered in digits.

Rendering is compact so that a character-level tokenizer gives one token per character and
no whitespace ambiguity: prompt "max 3815=", target "8"; "sort 3815=" -> "1358";
"sum 3815=" -> "17".
"""

from __future__ import annotations

import random
from typing import Callable

from peftrun.errors import ConfigError
from peftrun.tasks.base import Example, cap, check_limits, check_split
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


class ToyTask:
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
        for key in ("num_train", "num_dev", "num_test"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"task.{key}", f"is {getattr(cfg, key)}; use a count >= 0")
        space = len(self.ops) * 10**self.length
        if cfg.num_train + cfg.num_dev + cfg.num_test > space:
            raise ConfigError(
                "task.num_train",
                f"num_train + num_dev + num_test = {cfg.num_train + cfg.num_dev + cfg.num_test}"
                f" but only {space} distinct prompts exist for ops {self.ops} with list_length "
                f"{self.length}; lower the split sizes, or raise task.list_length or add ops",
            )
        self._splits: dict[str, list[Example]] | None = None

    def validate(self) -> None:
        pass  # everything was checked in __init__

    def _generate(self) -> dict[str, list[Example]]:
        cfg, n = self.cfg, 10**self.length
        space = len(self.ops) * n
        total = cfg.num_test + cfg.num_dev + cfg.num_train
        rng = random.Random(cfg.seed)
        # Draw distinct indices one at a time so the sequence is a stable prefix: test, then dev,
        # then train. Changing num_train never changes dev or test. When most of the space is
        # wanted, rejection would crawl, so shuffle the whole (then small) space instead.
        if total <= space // 2:
            seen: set[int] = set()
            order: list[int] = []
            while len(order) < total:
                i = rng.randrange(space)
                if i not in seen:
                    seen.add(i)
                    order.append(i)
        else:
            order = list(range(space))
            rng.shuffle(order)
            order = order[:total]
        examples = []
        for i in order:
            op, value = self.ops[i // n], i % n
            ex = render(op, [int(c) for c in str(value).zfill(self.length)])
            examples.append(ex)
        bounds = {"test": (0, cfg.num_test), "dev": (cfg.num_test, cfg.num_test + cfg.num_dev),
                  "train": (cfg.num_test + cfg.num_dev, total)}
        splits = {}
        for split, (lo, hi) in bounds.items():
            splits[split] = examples[lo:hi]
            for k, ex in enumerate(splits[split]):
                ex.id = f"toy-{split}-{k}"
        return splits

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        if self._splits is None:
            self._splits = self._generate()
        return cap(self._splits[split], split, self.cfg)

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        refs = [ex.references for ex in examples]
        out = {"exact_match": mean_score(exact_match, predictions, refs)}
        if len(self.ops) > 1:  # per-op breakdown: which operation the model has not learned yet
            for op in self.ops:
                idx = [i for i, ex in enumerate(examples) if ex.prompt.startswith(op + " ")]
                if idx:
                    out[f"exact_match_{op}"] = mean_score(
                        exact_match, [predictions[i] for i in idx], [refs[i] for i in idx]
                    )
        return out
