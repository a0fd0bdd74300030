"""Recompute a run's metrics from its predictions file, without a model or the dataset.

    python -m peftrun.evaluate outputs/RUN                 # RUN/predictions.jsonl + RUN/config.yaml
    peftrun-eval outputs/RUN/predictions.jsonl             # the same
    peftrun-eval preds.jsonl --config outputs/RUN/config.yaml

Each row of predictions.jsonl carries the prompt, target, references and the prediction, so
the task's own scorer (read from the run's config.yaml) gives the numbers of summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError, fail
from .tasks import build_task
from .tasks.base import Example

PREDICTIONS = "predictions.jsonl"
PROG = "peftrun-eval"


def locate(path: Path, config: Path | None) -> tuple[Path, Path]:
    """(predictions file, config file) from a run folder or a predictions file."""
    predictions = path / PREDICTIONS if path.is_dir() else path
    if not predictions.is_file():
        raise ConfigError("predictions", f"{predictions} does not exist; give a run folder that "
                                         f"holds {PREDICTIONS} or the file itself")
    config = config or predictions.parent / "config.yaml"
    if not config.is_file():
        raise ConfigError("config", f"{config} does not exist; pass the run's config.yaml with "
                                    f"--config")
    return predictions, config


def read_rows(path: Path) -> tuple[list[str], list[Example]]:
    predictions, examples = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("predictions", f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            predictions.append(row["prediction"])
            examples.append(Example(row.get("prompt", ""), row["target"], row.get("references"),
                                    str(row.get("id", ""))))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError("predictions", f"line {lineno} of {path} is not a predictions row "
                                             f"({type(e).__name__}: {e}); rows need target and "
                                             f"prediction")
    return predictions, examples


def evaluate(path: Path, config: Path | None = None) -> dict[str, float]:
    predictions_file, config_file = locate(Path(path), Path(config) if config else None)
    try:
        config = OmegaConf.load(config_file)
    except Exception as e:  # not YAML, not UTF-8
        raise ConfigError("config", f"{config_file} does not load as a run's config.yaml "
                                    f"({type(e).__name__}); pass the run's config.yaml with --config") from None
    if "task" not in config:
        raise ConfigError("config", f"{config_file} has no task section; pass the run's config.yaml with --config")
    task = build_task(config.task)  # lazy: reads no data
    predictions, examples = read_rows(predictions_file)
    return {"primary_metric": task.primary_metric, **task.score(predictions, examples)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.error = lambda message: fail(ValueError(message), PROG)  # one line, exit 2
    parser.add_argument("path", type=Path, help="a run folder or a predictions.jsonl file")
    parser.add_argument("--config", type=Path, help="the run's config.yaml (default: next to "
                                                    "the predictions)")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate(args.path, args.config)
    except ConfigError as e:
        fail(e, PROG)
    json.dump(metrics, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
