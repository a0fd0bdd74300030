"""Score predictions with a run's task, or evaluate a saved adapter on a task, writing elsewhere.

    peftrun-eval outputs/RUN                               # rescore RUN/predictions.jsonl
    peftrun-eval preds.jsonl --config outputs/RUN/config.yaml
    peftrun-eval outputs/RUN --predictions completions.jsonl --references refs.jsonl
    peftrun-eval outputs/RUN --task-file test.jsonl --output evals/test
    peftrun-eval outputs/RUN task.max_eval_samples=null --output evals/full

Rescoring needs no model: each row carries a prediction ("prediction", or "completion" as
`peftrun-generate` writes it) and its "target" or "references" (or --references gives them, line
by line), and the run's task scores them, giving the numbers of summary.json. With --output the
adapter of RUN (a run, checkpoint or adapter folder) is loaded onto its backbone, generates for
the test split of the run's task (changed by task=NAME / task.KEY=VALUE overrides, or by
--task-file: a jsonl or chat file read with the run's templates), and predictions.jsonl,
metrics.json and config.yaml are written into the --output folder, never into the run's.
The metrics are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, fail
from .tasks import build_task
from .tasks.base import Example

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
CONFIG = "config.yaml"
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


def json_lines(path: Path, key: str) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON-lines file; a ConfigError on `key`."""
    if not path.is_file():
        raise ConfigError(key, f"{path} does not exist; give a JSON-lines file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(key, f"line {lineno} of {path} is not JSON ({e.msg}, column {e.colno}); write "
                                   f"one JSON object per line") from None
    return rows


def reference(row: Any) -> tuple[str, list[str] | None]:
    """(target, references) of a row: its "target", else the first of its "references"."""
    refs = row.get("references")
    if refs is not None and (not isinstance(refs, list) or not refs):
        raise TypeError('"references" is not a non-empty list')
    target = row["target"] if "target" in row else (refs[0] if refs else None)
    if not isinstance(target, str):
        raise KeyError("target")
    return target, refs


def read_rows(path: Path, references: Path | None = None) -> tuple[list[str], list[Example]]:
    """Predictions ("prediction", or "completion" as peftrun-generate writes it) and their
    examples: the rows' own "target"/"references", or those of the `references` file, line by
    line."""
    rows = json_lines(path, "predictions")
    refs = json_lines(references, "references") if references is not None else None
    if refs is not None and len(refs) != len(rows):
        raise ConfigError("references", f"{references} has {len(refs)} rows and {path} {len(rows)}; give one "
                                        f"reference row per prediction, in the same order")
    predictions, examples = [], []
    for i, (lineno, row) in enumerate(rows):
        try:
            prediction = row["prediction"] if "prediction" in row else row["completion"]
            if not isinstance(prediction, str):
                raise TypeError('the prediction is not a string')
            prompt = row.get("prompt", "")
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError("predictions", f"line {lineno} of {path} is not a predictions row "
                                             f"({type(e).__name__}: {e}); rows need a \"prediction\" (or "
                                             f"\"completion\") string") from None
        ref_lineno, ref_row, ref_key, ref_path = (lineno, row, "predictions", path) if refs is None else \
            (*refs[i], "references", references)
        try:
            target, refs_list = reference(ref_row)
        except (KeyError, TypeError, AttributeError) as e:
            hint = "; or pass --references refs.jsonl" if refs is None else ""
            raise ConfigError(ref_key, f"line {ref_lineno} of {ref_path} has no reference ({type(e).__name__}: "
                                       f"{e}); rows need a \"target\" string or \"references\" (a list of "
                                       f"strings){hint}") from None
        ident = row.get("id", ref_row.get("id", "")) if isinstance(row, dict) else ""
        predictions.append(prediction)
        examples.append(Example(prompt if isinstance(prompt, str) else "", target, refs_list, str(ident)))
    return predictions, examples


def load_run_config(config_file: Path) -> DictConfig:
    try:
        config = OmegaConf.load(config_file)
    except Exception as e:  # not YAML, not UTF-8
        raise ConfigError("config", f"{config_file} does not load as a run's config.yaml "
                                    f"({type(e).__name__}); pass the run's config.yaml with --config") from None
    if not isinstance(config, DictConfig) or "task" not in config:
        raise ConfigError("config", f"{config_file} has no task section; pass the run's config.yaml with --config")
    return config


def evaluate(path: Path | None, config: Path | None = None, predictions: Path | None = None,
             references: Path | None = None) -> dict[str, float]:
    """The metrics of a predictions file scored by a run's task. `path`: a run folder (its
    predictions.jsonl and config.yaml) or a predictions file; `predictions` another file to score
    with the run's task; `references`: the targets, one row per prediction."""
    if predictions is not None:
        config_file = Path(config) if config else run_config_file(Path(path)) if path is not None else \
            Path(predictions).parent / CONFIG
        if not config_file.is_file():
            raise ConfigError("config", f"{config_file} does not exist; name the run whose task scores the "
                                        f"predictions (peftrun-eval RUN --predictions FILE) or pass --config")
        predictions_file = Path(predictions)
    else:
        if path is None:
            raise ConfigError("predictions", "nothing to score; give a run folder, a predictions file or "
                                             "--predictions FILE")
        predictions_file, config_file = locate(Path(path), Path(config) if config else None)
    config = load_run_config(config_file)
    task = build_task(config.task)  # lazy: reads no data
    preds, examples = read_rows(predictions_file, Path(references) if references is not None else None)
    return {"primary_metric": task.primary_metric, **task.score(preds, examples)}


def run_config_file(path: Path) -> Path:
    """The config.yaml of a run, checkpoint or adapter folder (in it, or one level up for an
    adapter folder)."""
    for folder in (path, path.parent):
        if (folder / CONFIG).is_file():
            return folder / CONFIG
    return path / CONFIG


# ----------------------------------------------------------------------------- a saved adapter on a task
FILE_TASKS = ("jsonl", "chat")  # tasks that read a test_file (--task-file)


def task_config(run_task: dict, overrides: list[str], task_file: Path | None) -> DictConfig:
    """The task to evaluate on: the run's (its saved values over the schema of its option), or
    another option (task=NAME), with task.KEY=VALUE overrides; --task-file is its test file."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .cli import CONFIG_DIR, compose_config

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # a malformed override
        raise ConfigError("overrides", " ".join(str(e).split())) from None
    keys = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override() or o.is_delete() or o.is_add() or o.is_force_add() or \
                not (key == "task" or key.startswith("task.")):
            raise ConfigError("overrides", f"{o.input_line!r}: only task=NAME and task.KEY=VALUE apply here (the "
                                           f"model and the adapter are the run's); e.g. task.max_eval_samples=100")
        keys.append(key)
    chosen = next((o.value() for o in parsed if o.get_key_element() == "task"), None)
    option = chosen or run_task.get("name")
    if not (CONFIG_DIR / "task" / f"{option}.yaml").is_file():
        if chosen:
            options = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
            raise ConfigError("task", f"no option {chosen!r}; choose one of: {', '.join(options)}")
        cfg = OmegaConf.create(run_task)  # an option of the user's own: the saved values, untyped
        for o in parsed:
            OmegaConf.update(cfg, o.get_key_element().removeprefix("task."), o.value(), merge=True)
    else:
        try:
            composed = compose_config([f"task={option}", *[o.input_line for o in parsed if o.get_key_element() != "task"]])
        except Exception as e:
            from .cli import explain_composition_error

            raise explain_composition_error(e) from None
        cfg = composed.task
        if not chosen:  # the run's own task: its saved values, then the overrides again
            try:
                cfg = OmegaConf.merge(cfg, run_task)
            except Exception as e:
                raise ConfigError("config", f"the run's task section does not load ({' '.join(str(e).split())})") from None
            for key in keys:
                sub = key.removeprefix("task.")
                OmegaConf.update(cfg, sub, OmegaConf.select(composed.task, sub), merge=False)
    if task_file is not None:
        if not Path(task_file).is_file():
            raise ConfigError("task-file", f"{task_file} is not a file; give the test file to evaluate on")
        name = cfg.get("name")
        if name not in FILE_TASKS:
            raise ConfigError("task-file", f"task={name} reads no test file; --task-file takes a file of a jsonl or "
                                           f"chat run (for task={name}, change the test split with task.KEY=VALUE)")
        path = str(Path(task_file).expanduser().absolute())
        # The file serves every split (only the test split is generated), all of it unless told.
        cfg.train_file = cfg.dev_file = cfg.test_file = path
        if "task.max_eval_samples" not in keys:
            cfg.max_eval_samples = None
        if "task.max_train_samples" not in keys:
            cfg.max_train_samples = 1
        if name == "chat":
            cfg.hub_id = None
    return cfg


def check_output(output: Path, run_dir: Path) -> None:
    """The --output folder: new, or an earlier evaluation's; never in the run folder or above it."""
    out, run = output.expanduser().absolute(), run_dir.expanduser().absolute()
    if out == run or run in out.parents or out in run.parents:
        where = "is" if out == run else "is inside" if run in out.parents else "holds"
        raise ConfigError("output", f"{output} {where} the run folder {run_dir}; write evaluations elsewhere, "
                                    f"e.g. --output evals/NAME")
    if out.exists() and not out.is_dir():
        raise ConfigError("output", f"{output} is a file; give a folder for the predictions and metrics")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in (PREDICTIONS, METRICS, CONFIG))
        if others:
            raise ConfigError("output", f"{output} holds other files ({', '.join(others[:3])}); give a new folder "
                                        f"(an earlier evaluation's is replaced)")


def evaluate_adapter(run: Path, output: Path, overrides: list[str] = (), task_file: Path | None = None, *,
                     batch_size: int | None = None, max_new_tokens: int | None = None,
                     num_beams: int | None = None, device: str | None = None,
                     trust_remote_code: bool = False) -> dict[str, Any]:
    """Generate with the saved adapter of `run` for the test split of a task, score it with the
    task's metric and write predictions.jsonl, metrics.json and config.yaml into `output`
    (atomically: a temporary sibling, then a rename). Returns the metrics."""
    from .config import ModelConfig
    from .generate import generate
    from .host_memory import keep_freed_memory
    from .methods import replace_dir
    from .models import load_tokenizer
    from .multitenant import load_tenants, locate_adapter
    from .tasks import bind_tokenizer

    saved = locate_adapter("default", run)
    config_file = run_config_file(saved.folder)
    if not config_file.is_file():
        raise ConfigError("run", f"no {CONFIG} next to {saved.folder} or its parent; give the run folder")
    run_cfg = load_run_config(config_file)
    run_dir = config_file.parent
    if run_dir.parent.name == "checkpoints":  # a checkpoint: its run folder is protected too
        run_dir = run_dir.parent.parent
    check_output(Path(output), run_dir)
    run_dict = OmegaConf.to_container(run_cfg, resolve=True)
    cfg = task_config(dict(run_dict["task"]), list(overrides), task_file)
    # Every check that needs no weights: the task, its files, the tokenizer's rendering.
    try:
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), run_dict.get("model") or {})
    except Exception as e:
        raise ConfigError("model", f"the run's model config does not load ({' '.join(str(e).split())})") from None
    model_cfg.trust_remote_code = bool(trust_remote_code)
    try:
        task = build_task(cfg)
        task.validate()
        bind_tokenizer(task, load_tokenizer(model_cfg))
        examples = task.examples("test")
    except ConfigError as e:  # the file given is every split: name the flag, not the keys it set
        if task_file is not None and e.key in ("task.train_file", "task.dev_file", "task.test_file"):
            raise ConfigError("task-file", e.message) from None
        raise
    if not examples:
        raise ConfigError("task", "the test split is empty; give a test file with records "
                                  "(--task-file) or task.max_eval_samples above 0")
    trainer = run_dict.get("trainer") or {}
    keep_freed_memory()  # each batch reuses the last one's memory (host_memory.py)
    model, tokenizer, router, _ = load_tenants({"default": run}, device, trust_remote_code=trust_remote_code)
    predictions = generate(model, tokenizer, router, [e.prompt for e in examples],
                           batch_size=batch_size or trainer.get("eval_batch_size") or 32,
                           max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                           num_beams=num_beams or trainer.get("num_beams") or 1,
                           max_prompt_length=cfg.max_length)
    metrics = {"primary_metric": task.primary_metric, **task.score(predictions, examples)}
    rows = [{"id": e.id, "prompt": e.prompt, "target": e.target, "references": e.references, "prediction": p}
            for e, p in zip(examples, predictions)]
    run_dict["task"] = OmegaConf.to_container(cfg, resolve=True)
    output = Path(output)
    tmp = output.with_name(f".tmp-{output.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / PREDICTIONS).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (tmp / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(run_dict)))
    replace_dir(tmp, output)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.error = lambda message: fail(ValueError(message), PROG)  # one line, exit 2
    parser.add_argument("path", type=Path, nargs="?",
                        help="a run folder (or checkpoint or adapter folder with --output), or a predictions file")
    parser.add_argument("overrides", nargs="*", metavar="task.KEY=VALUE",
                        help="with --output: task=NAME or task.KEY=VALUE changes to the run's task")
    parser.add_argument("--config", type=Path, help="the run's config.yaml (default: next to the predictions)")
    parser.add_argument("--predictions", type=Path, metavar="FILE.jsonl",
                        help="score this file (peftrun-generate's output too) with the task of the run given")
    parser.add_argument("--references", type=Path, metavar="FILE.jsonl",
                        help='targets, one row per prediction in the same order: {"target": ...} or {"references": [...]}')
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help="generate with the run's adapter and write predictions.jsonl, metrics.json and "
                             "config.yaml into DIR (not inside the run folder)")
    parser.add_argument("--task-file", type=Path, metavar="FILE",
                        help="with --output: evaluate on this test file (a jsonl or chat run's format)")
    parser.add_argument("--batch-size", type=int, help="with --output; default: the run's trainer.eval_batch_size")
    parser.add_argument("--max-new-tokens", type=int, help="with --output; default: the task's max_new_tokens")
    parser.add_argument("--num-beams", type=int, help="with --output; default: the run's trainer.num_beams")
    parser.add_argument("--device", help="with --output; default: cuda when available, else cpu")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="with --output: let the backbone run code of its own (never taken from config.yaml)")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the flags
    for flag in ("batch_size", "max_new_tokens", "num_beams"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    generating = ("task_file", "batch_size", "max_new_tokens", "num_beams", "device", "trust_remote_code")
    try:
        if args.output is not None:
            for flag in ("predictions", "references", "config"):
                if getattr(args, flag) is not None:
                    raise ConfigError(flag, f"--output generates new predictions; leave out --{flag} (or "
                                            f"--output, to score the file given)")
            if args.path is None:
                raise ConfigError("output", "give the run whose adapter to evaluate: peftrun-eval RUN --output DIR")
            metrics = evaluate_adapter(
                args.path, args.output, args.overrides, args.task_file, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, device=args.device,
                trust_remote_code=args.trust_remote_code)
        else:
            given = [f for f in generating if getattr(args, f)] + (["overrides"] if args.overrides else [])
            if given:
                flag = given[0].replace("_", "-")
                raise ConfigError(flag, f"{'task overrides apply' if flag == 'overrides' else f'--{flag} applies'} "
                                        f"when evaluating an adapter; add --output DIR for its predictions and "
                                        f"metrics")
            metrics = evaluate(args.path, args.config, args.predictions, args.references)
    except ConfigError as e:
        if e.key == "model.trust_remote_code":
            e = ConfigError("trust-remote-code", "the backbone ships code of its own; pass --trust-remote-code "
                                                 "to run it, if you trust it")
        fail(e, PROG)
    json.dump(metrics, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
