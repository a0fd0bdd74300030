"""Local JSON-lines files, one object per line, rendered into (prompt, target) by templates.

Read with plain `json` rather than `datasets` so that a malformed line can be reported by its
line number, and so that nothing touches the network or the datasets cache.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from peftrun.errors import ConfigError
from peftrun.tasks.base import BuiltOnce, Example, check_limits
from peftrun.tasks.metrics import METRICS, mean_score
from peftrun.tasks.template import check_templates, render_template

DEV_FRACTION = 0.1  # held out of train when no dev_file is given
DEV_SEED = 0  # fixed, so the held-out dev set does not move with trainer.seed
PEEK_LINES = 20  # records checked by validate()

Record = tuple[int, dict]  # (1-based line number, object)


def _resolve(path: str | None) -> Path | None:
    # Resolved once, at construction, so a later chdir (Hydra's job.chdir) cannot move it.
    return None if path in (None, "") else Path(path).expanduser().absolute()


def read_records(path: Path, key: str, limit: int | None = None) -> list[Record]:
    """Parse up to `limit` non-blank lines of `path`; any problem is a ConfigError on `key`."""
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist; check the path (relative paths resolve "
                               f"against the directory you run from)")
    if not path.is_file():
        raise ConfigError(key, f"{path} is not a file; point it at a .jsonl file")
    records: list[Record] = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if limit is not None and len(records) >= limit:
                    break
                if not line.strip():
                    continue  # blank lines, e.g. a trailing newline, are allowed
                try:
                    obj = json.loads(line.rstrip())  # keep column numbers on line 1
                except json.JSONDecodeError as e:
                    raise ConfigError(key, f"line {lineno} of {path} is not valid JSON ({e.msg}, "
                                           f"column {e.colno}); write one JSON object per line")
                if not isinstance(obj, dict):
                    raise ConfigError(key, f"line {lineno} of {path} is a JSON "
                                           f"{type(obj).__name__}, not an object; write one "
                                           f"JSON object per line")
                records.append((lineno, obj))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"cannot read {path} as UTF-8 text ({e})")
    if not records:
        raise ConfigError(key, f"{path} has no records; write one JSON object per line")
    return records


def render(template: str, key: str, record: dict, lineno: int, path: Path) -> str:
    try:
        return render_template(template, record)
    except KeyError as e:
        fields = ", ".join(record) or "(none)"
        raise ConfigError(key, f"field {e.args[0]!r} is missing from line {lineno} of {path}; "
                               f"fields there: {fields}")
    except IndexError:
        raise ConfigError(key, f"{template!r} has a positional field {{}}; name a record "
                               f"field instead, e.g. {{question}}")
    except (ValueError, AttributeError, TypeError) as e:
        raise ConfigError(key, f"{template!r} is not a valid format string for line {lineno} "
                               f"of {path} ({e}); escape literal braces as {{{{ and }}}}")


class JsonlTask(BuiltOnce):
    name = "jsonl"

    def __init__(self, cfg):
        self.cfg = cfg
        check_limits(cfg)
        check_templates(cfg)
        if cfg.metric not in METRICS:
            raise ConfigError("task.metric", f"unknown metric {cfg.metric!r}; use one of "
                                             f"{', '.join(METRICS)}")
        self.primary_metric = cfg.metric
        self.files = {
            "train": _resolve(cfg.train_file),
            "dev": _resolve(cfg.dev_file),
            "test": _resolve(cfg.test_file),
        }
        if self.files["train"] is None:
            raise ConfigError("task.train_file", "is not set; give a path to a .jsonl file, "
                                                 "e.g. task.train_file=data/train.jsonl")

    def _given(self) -> list[tuple[str, Path]]:
        return [(s, p) for s, p in self.files.items() if p is not None]

    def validate(self) -> None:
        """Each given file exists, its first lines parse, and both templates render on them."""
        for split, path in self._given():
            for lineno, rec in read_records(path, f"task.{split}_file", limit=PEEK_LINES):
                self._render(rec, lineno, path)
        if self.files["dev"] is None and len(read_records(self.files["train"],
                                                          "task.train_file", limit=2)) < 2:
            raise ConfigError("task.dev_file", "is not set and the train file has a single "
                                               "record, too few to hold out a dev set; set "
                                               "task.dev_file")

    def _render(self, rec: dict, lineno: int, path: Path) -> Example:
        return Example(
            prompt=render(self.cfg.prompt_template, "task.prompt_template", rec, lineno, path),
            target=render(self.cfg.target_template, "task.target_template", rec, lineno, path),
            id=str(rec["id"]) if "id" in rec else f"{path.name}:{lineno}",
        )

    def _load(self, split: str) -> list[Example]:
        path = self.files[split]
        return [self._render(rec, n, path) for n, rec in read_records(path, f"task.{split}_file")]

    def _build(self) -> dict[str, list[Example]]:
        train = self._load("train")
        if self.files["dev"] is not None:
            dev = self._load("dev")
        else:
            if len(train) < 2:
                raise ConfigError("task.dev_file", "is not set and the train file has a single "
                                                   "record; set task.dev_file")
            # Hold out before max_train_samples so the dev set does not depend on it.
            n_dev = max(1, round(DEV_FRACTION * len(train)))
            held = set(random.Random(DEV_SEED).sample(range(len(train)), n_dev))
            dev = [ex for i, ex in enumerate(train) if i in held]
            train = [ex for i, ex in enumerate(train) if i not in held]
        test = self._load("test") if self.files["test"] is not None else dev
        return {"train": train, "dev": dev, "test": test}

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        refs = [ex.references for ex in examples]
        return {name: mean_score(fn, predictions, refs) for name, fn in METRICS.items()}
