"""Load a task's raw records: from the Hugging Face Hub by dataset id, or from local files in
the same schema (`task.data_files`). Every failure is a one-line ConfigError that names the
task and says how to point it at local files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftrun.errors import ConfigError

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
Records = list[dict[str, Any]]


def offline() -> bool:
    """True when the user (or a test) asked the Hugging Face libraries not to use the network."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def local_hint(task: str, dev_split: str | None = "validation") -> str:
    example = f"{{train:train.jsonl,{dev_split}:dev.jsonl}}" if dev_split else "train.jsonl"
    return f"point task={task} at local files in the same schema, e.g. task.data_files={example}"


def normalize_data_files(data_files: Any) -> dict[str, list[Path]]:
    """`data_files` as {source split: [absolute paths]}; one path or list means the train split.
    Resolved at construction so that a later chdir cannot move it."""
    if data_files in (None, ""):
        return {}
    if isinstance(data_files, (str, os.PathLike)):
        data_files = {"train": [data_files]}
    elif not hasattr(data_files, "items"):  # a list of paths
        data_files = {"train": list(data_files)}
    out = {}
    for split, paths in data_files.items():
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        out[str(split)] = [Path(p).expanduser().absolute() for p in paths]
    return out


def check_files(files: dict[str, list[Path]]) -> str:
    """The datasets builder for `files` (json, csv or parquet); ConfigError if one is missing or
    the formats differ."""
    kinds = set()
    for split, paths in files.items():
        for path in paths:
            if not path.is_file():
                raise ConfigError("task.data_files", f"{split}: {path} does not exist or is not a "
                                                     f"file; relative paths resolve against the "
                                                     f"directory you run from")
            if path.suffix.lower() not in FORMATS:
                raise ConfigError("task.data_files", f"{path.name}: unknown format; use "
                                                     f"{', '.join(FORMATS)} files")
            kinds.add(FORMATS[path.suffix.lower()])
    if len(kinds) > 1:
        raise ConfigError("task.data_files", f"mixes formats ({', '.join(sorted(kinds))}); "
                                             f"use one format for every split")
    return kinds.pop()


def load_records(task: str, hub_id: str | None, hub_config: str | None, revision: str | None,
                 data_files: dict[str, list[Path]], dev_split: str | None = "validation",
                 ) -> dict[str, Records]:
    """{source split name: records as plain dicts}, from local files when given, else the Hub."""
    import datasets

    datasets.disable_progress_bars()  # one-line errors and a quiet console
    if data_files:
        builder = check_files(data_files)
        try:
            loaded = datasets.load_dataset(builder, data_files={s: [str(p) for p in ps]
                                                                 for s, ps in data_files.items()})
        except Exception as e:  # malformed JSON, inconsistent columns, ...
            raise ConfigError("task.data_files", f"cannot read the files of task {task} as "
                                                 f"{builder} ({_first_line(e)}); write one record "
                                                 f"per line/row in the dataset's schema")
        return {split: loaded[split].to_list() for split in loaded}
    if not hub_id:
        raise ConfigError("task.hub_id", f"task {task} has neither a Hub id nor local files; "
                                         f"{local_hint(task, dev_split)}")
    try:
        loaded = datasets.load_dataset(hub_id, hub_config, revision=revision)
    except Exception as e:
        raise hub_error(task, hub_id, hub_config, e, dev_split) from None
    return {split: loaded[split].to_list() for split in loaded}


def check_hub(task: str, hub_id: str, hub_config: str | None, revision: str | None,
              dev_split: str | None = "validation") -> None:
    """A cheap reachability check for validate(): the dataset's Hub page, no data. Skipped
    offline (then the load itself, later, reports a missing dataset)."""
    if offline():
        return
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(hub_id, revision=revision, timeout=10)
    except Exception as e:
        raise hub_error(task, hub_id, hub_config, e, dev_split) from None


def hub_error(task: str, hub_id: str, hub_config: str | None, err: Exception,
              dev_split: str | None = "validation") -> ConfigError:
    text = f"{type(err).__name__}: {err}".lower()
    source = hub_id + (f" ({hub_config})" if hub_config else "")
    if "gated" in text or "401" in text or "403" in text or "authenticat" in text:
        why = "it is gated or private: accept its terms on the Hub and log in (hf auth login), or"
    elif "offline" in text or "connect" in text or "timed out" in text or "resolve" in text:
        why = "the Hub cannot be reached (offline?):"
    elif "notfound" in text or "404" in text or "doesn't exist" in text or "not found" in text:
        why = "no such dataset or config on the Hub: check task.hub_id / task.hub_config, or"
    else:
        why = f"{_first_line(err)}:"
    return ConfigError("task.hub_id", f"task {task} cannot load {source}; {why} "
                                      f"{local_hint(task, dev_split)}")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]
