"""Task registry: `build_task(cfg.task)` picks the class from `cfg.task.name`."""

from __future__ import annotations

from peftrun.errors import ConfigError
from peftrun.tasks.base import Example, Task, bind_tokenizer
from peftrun.tasks.chat import ChatTask
from peftrun.tasks.choice import CopaTask, HellaswagTask, SiqaTask
from peftrun.tasks.e2e import E2eNlgTask
from peftrun.tasks.glue import BoolqTask, QnliTask, RecordTask, RteTask, Sst2Task
from peftrun.tasks.instruction import AlpacaTask
from peftrun.tasks.jsonl import JsonlTask
from peftrun.tasks.math import Gsm8kTask
from peftrun.tasks.qa import SquadTask
from peftrun.tasks.summarization import DialogsumTask
from peftrun.tasks.synthetic import SYNTHETIC_TASKS
from peftrun.tasks.toy import ToyTask
from peftrun.tasks.translation import Iwslt2017Task

TASKS = {"toy": ToyTask, "jsonl": JsonlTask}
# The papers' datasets (Hub or local files in the same schema).
TASKS.update({cls.name: cls for cls in (
    SquadTask, Gsm8kTask, DialogsumTask, HellaswagTask, SiqaTask, CopaTask, Sst2Task, RteTask,
    QnliTask, BoolqTask, RecordTask, Iwslt2017Task, E2eNlgTask, AlpacaTask)})
# Offline tasks over the invented world of the pretrained tiny backbone (scripts/pretrain_tiny.py).
TASKS.update({cls.name: cls for cls in SYNTHETIC_TASKS})
# Your own conversations, rendered with the tokenizer's chat template.
TASKS["chat"] = ChatTask


def build_task(cfg) -> Task:
    """Construct the task named by `cfg.name` from its config (a DictConfig or a dataclass)."""
    try:
        name = cfg.name
    except Exception:  # a missing attribute, or OmegaConf's MissingMandatoryValue ("???")
        name = None
    if name not in TASKS:
        raise ConfigError("task.name", f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name](cfg)


__all__ = ["Example", "Task", "TASKS", "bind_tokenizer", "build_task", "ChatTask", "JsonlTask", "ToyTask"]
