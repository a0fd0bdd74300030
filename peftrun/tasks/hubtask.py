"""The shared part of every Hub dataset task: load (Hub or local files), extract the task's
fields from each record, render them through the config's templates, split, cap, score.

A subclass names its fields (`fields`), optionally the references a prediction is scored
against (`references`), and its metric (`metrics`). Loading is lazy: constructing a task (as
`peftrun.evaluate` does to rescore a predictions file) reads nothing.
"""

from __future__ import annotations

from typing import Any, Sequence

from peftrun.errors import ConfigError
from peftrun.tasks.base import BuiltOnce, Example, check_limits
from peftrun.tasks.hub import check_hub, load_records, local_hint, normalize_data_files
from peftrun.tasks.splits import RECIPES, make_splits
from peftrun.tasks.template import check_templates, render_template

PEEK_RECORDS = 20  # records per split that validate() renders


class HubTask(BuiltOnce):
    name = "hub"
    primary_metric = "exact_match"
    # Fields a record must carry in the Hub schema (for the error message on a wrong file).
    schema: tuple[str, ...] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        check_limits(cfg)
        check_templates(cfg)
        if cfg.split_recipe not in RECIPES:
            raise ConfigError("task.split_recipe", f"unknown recipe {cfg.split_recipe!r}; use "
                                                   f"{' or '.join(RECIPES)}")
        self.files = normalize_data_files(cfg.data_files)

    @property
    def reads_hub(self) -> bool:
        """The data come from the Hub (a download), not from local files."""
        return not self.files

    # ----------------------------------------------------------------- what a subclass says
    def fields(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Named values for the templates; None skips the record (e.g. an unlabelled one)."""
        return dict(record)

    def references(self, fields: dict[str, Any], target: str) -> list[str]:
        """What a prediction is scored against; the rendered target by default."""
        return [target]

    def metrics(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
        raise NotImplementedError

    def finish_eval(self, examples: list[Example]) -> list[Example]:
        """A hook for dev/test after splitting (E2E groups the references of one input)."""
        return examples

    # ----------------------------------------------------------------- the shared part
    def validate(self) -> None:
        """Local files: they exist, the named splits are there, and the first records render.
        Hub: a reachability check, skipped offline (the load reports it then)."""
        if not self.files:
            check_hub(self.name, self.cfg.hub_id, self.cfg.hub_config, self.cfg.revision,
                      self.cfg.dev_split)
            return
        source = self._load()
        for split, records in source.items():
            for i, record in enumerate(records[:PEEK_RECORDS]):
                self.render(record, split, i)

    def _load(self) -> dict[str, list[dict]]:
        cfg = self.cfg
        source = load_records(self.name, cfg.hub_id, cfg.hub_config, cfg.revision, self.files,
                              cfg.dev_split)
        wanted = [("task.train_split", cfg.train_split)]
        if cfg.dev_split and not self.files:  # local files may leave dev out: it is held out
            wanted.append(("task.dev_split", cfg.dev_split))
        if cfg.test_split and cfg.split_recipe == "original":
            wanted.append(("task.test_split", cfg.test_split))
        used = {cfg.train_split, cfg.dev_split, cfg.test_split} - {None}
        for split in self.files:  # a file under an unused split name would be silently ignored
            if split not in used:
                raise ConfigError("task.data_files", f"split {split!r} is not read by task "
                                                     f"{self.name} (it reads "
                                                     f"{', '.join(sorted(used))}); rename it or "
                                                     f"set task.dev_split={split}")
        for key, split in wanted:
            if split not in source:
                where = "task.data_files" if self.files else f"{cfg.hub_id}"
                raise ConfigError(key, f"no split {split!r} in {where} (splits: "
                                       f"{', '.join(source)}); set {key} to one of them")
        return source

    def render(self, record: dict[str, Any], split: str, index: int) -> Example | None:
        try:
            fields = self.fields(record)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            have = ", ".join(record) or "(none)"
            raise ConfigError("task.data_files" if self.files else "task.hub_id",
                              f"record {index} of split {split!r} does not fit task {self.name} "
                              f"({type(e).__name__}: {e}); it needs {', '.join(self.schema)}; it "
                              f"has {have}")
        if fields is None:
            return None
        prompt = self._format("task.prompt_template", self.cfg.prompt_template, fields)
        target = self._format("task.target_template", self.cfg.target_template, fields)
        ident = fields.get("id", record.get("id", record.get("idx")))
        return Example(prompt=prompt, target=target, references=self.references(fields, target),
                       id=f"{split}-{index}" if ident in (None, "") else str(ident))

    def _format(self, key: str, template: str, fields: dict[str, Any]) -> str:
        try:
            return render_template(template, fields)
        except KeyError as e:
            raise ConfigError(key, f"{{{e.args[0]}}} is not a field of task {self.name}; use "
                                   f"{', '.join('{' + f + '}' for f in fields)}")
        except (IndexError, ValueError, AttributeError) as e:
            raise ConfigError(key, f"{template!r} is not a valid format string ({e}); escape "
                                   f"literal braces as {{{{ and }}}}")

    def _build(self) -> dict[str, list[Example]]:
        cfg = self.cfg
        source = self._load()

        def rendered(split: str | None) -> list[Example] | None:
            if not split or split not in source:
                return None
            out = (self.render(r, split, i) for i, r in enumerate(source[split]))
            return [ex for ex in out if ex is not None]

        train = rendered(cfg.train_split)
        if not train:
            raise ConfigError("task.train_split", f"split {cfg.train_split!r} of task {self.name} "
                                                  f"has no usable (labelled) records; "
                                                  f"{local_hint(self.name, cfg.dev_split)}")
        test = rendered(cfg.test_split) if cfg.split_recipe == "original" else None
        splits = make_splits(train, rendered(cfg.dev_split), test, cfg.split_recipe, cfg.seed)
        for split in ("dev", "test"):
            splits[split] = self.finish_eval(splits[split])
        return splits

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        return self.metrics(predictions, [ex.references for ex in examples])
