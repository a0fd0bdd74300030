"""Task registry: `build_task(cfg.task)` picks the class from `cfg.task.name`."""

from __future__ import annotations

from peftrun.errors import ConfigError
from peftrun.tasks.base import Example, Task
from peftrun.tasks.jsonl import JsonlTask
from peftrun.tasks.toy import ToyTask

TASKS = {"toy": ToyTask, "jsonl": JsonlTask}


def build_task(cfg) -> Task:
    """Construct the task named by `cfg.name` from its config (a DictConfig or a dataclass)."""
    try:
        name = cfg.name
    except Exception:  # a missing attribute, or OmegaConf's MissingMandatoryValue ("???")
        name = None
    if name not in TASKS:
        raise ConfigError("task.name", f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name](cfg)


__all__ = ["Example", "Task", "TASKS", "build_task", "JsonlTask", "ToyTask"]
