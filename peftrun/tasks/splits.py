"""Train/dev/test from a dataset's own splits, optionally by the ALoRA/PARA/IAPT recipe.

The papers' recipe (DESIGN.md §3): under 10k training examples the original dev set is halved
into dev and test; otherwise 1k training examples become the dev set and the original dev set is
the test set (the original test sets are mostly unlabelled). Every shuffle is seeded and depends
on nothing but the seed and the data, so max_train_samples never moves dev or test.
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

from peftrun.errors import ConfigError

T = TypeVar("T")
RECIPES = ("paper", "original")
SMALL_TRAIN = 10_000  # below this, the original dev set is halved
PAPER_DEV_SIZE = 1_000  # above it, this many training examples become dev
HELD_OUT_FRACTION = 0.1  # of train, when the source has no dev split


def shuffled(items: Sequence[T], seed: int, purpose: str) -> list[T]:
    """A seeded permutation; `purpose` keeps the shuffles of different cuts independent."""
    order = list(range(len(items)))
    random.Random(f"{seed}-{purpose}").shuffle(order)  # str seeds are hashed stably (sha512)
    return [items[i] for i in order]


def hold_out(train: list[T], seed: int) -> tuple[list[T], list[T]]:
    """(train, dev): a dev set cut from train when the source has none."""
    if len(train) < 3:
        raise ConfigError("task.dev_split", f"the source has no dev split and only {len(train)} "
                                            f"training example(s) to hold one out of; give a dev "
                                            f"split (task.dev_split, task.data_files)")
    # At least 2, so that the paper recipe can halve it into dev and test.
    n_dev = max(2, min(PAPER_DEV_SIZE, round(HELD_OUT_FRACTION * len(train))))
    mixed = shuffled(train, seed, "held-out-dev")
    return mixed[n_dev:], mixed[:n_dev]


def make_splits(train: list[T], dev: list[T] | None, test: list[T] | None, recipe: str,
                seed: int) -> dict[str, list[T]]:
    """{"train", "dev", "test"} from the source's train, dev (None: absent) and test (None:
    absent or not wanted) by `recipe` ("paper" or "original")."""
    if recipe not in RECIPES:
        raise ConfigError("task.split_recipe", f"unknown recipe {recipe!r}; use paper or original")
    if dev is None:
        train, dev = hold_out(train, seed)
    if recipe == "original":
        return {"train": train, "dev": dev, "test": test if test is not None else dev}
    if len(train) < SMALL_TRAIN:
        if len(dev) < 2:
            raise ConfigError("task.split_recipe", f"the paper recipe halves the dev set, which has "
                                                   f"{len(dev)} example(s); give more or use "
                                                   f"task.split_recipe=original")
        mixed = shuffled(dev, seed, "halve-dev")
        half = len(mixed) // 2
        return {"train": train, "dev": mixed[:half], "test": mixed[half:]}
    mixed = shuffled(train, seed, "train-to-dev")
    return {"train": mixed[PAPER_DEV_SIZE:], "dev": mixed[:PAPER_DEV_SIZE], "test": dev}
