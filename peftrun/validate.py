"""Every check that needs no weights, once: config values, files, targets on a meta-device model.

Keys the schemas do not know (also those added with `+` / `++`), numbers that are not finite or
out of range, templates, a batch larger than the data and a method's schedule longer than the
run are all refused here, before anything is tokenized or loaded.

`validate(cfg)` raises a ConfigError (one line, naming the key) or returns what it built on the
way — the task, the tokenizer and the method — as a `Prepared`, which the run then uses instead
of building them again. The command line validates before Hydra creates the run folder and
Hydra's job validates again; `validate(cfg, keep=True)` / `validated(cfg)` make the second one,
in the same process and for the same resolved config, take the first one's result. A job started
in another process (a submitit sweep) validates once, there.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from .config import tracker_names
from .distributed import check_sharding
from .errors import ConfigError
from .methods import build_method
from .methods.base import Method
from .model_checks import validate_model_config
from .models import load_tokenizer, meta_model
from .packing import check_packing
from .tasks import Task, bind_tokenizer, build_task


@dataclass(frozen=True)
class Prepared:
    """What a run needs built before any weights: handed from validation to `train`."""

    cfg: DictConfig  # the config these were built from (and, through `validate`, checked against)
    task: Task
    tokenizer: PreTrainedTokenizerBase
    method: Method

    @classmethod
    def build(cls, cfg: DictConfig) -> Prepared:
        """The same objects without the checks (a caller that trusts its config: tests, benchmarks)."""
        task, tokenizer = build_task(cfg.task), load_tokenizer(cfg.model)
        bind_tokenizer(task, tokenizer)  # a chat task renders through it
        return cls(cfg, task, tokenizer, build_method(cfg.method))


# ----------------------------------------------------------------------------- keys and numbers
def check_keys(cfg: DictConfig) -> None:
    """Every key is one its schema knows, also one added with `+key=...` or `++key=...` (Hydra
    lets those past a schema: they would be carried along and silently do nothing)."""
    _check_node_keys(cfg, "")


def _check_node_keys(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):  # a free-form value (e.g. task.data_files)
        return
    known = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        if key not in known:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            group = full.split(".")[0]
            shows = f"`peftrun --cfg job` shows the keys of {group}" if prefix else "`peftrun --cfg job` shows the config"
            raise ConfigError(full, f"unknown key{hint}; {shows}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _check_node_keys(child, f"{prefix}{key}.")


def check_finite(cfg: DictConfig) -> None:
    """No number of the config is NaN or infinite (a float key accepts `nan` and `inf`)."""
    def walk(value: Any, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=True), "")


# ----------------------------------------------------------------------------- the trainer
def check_trainer(cfg: DictConfig) -> None:
    """The trainer's values (and the task's length), each against its allowed range."""
    t = cfg.trainer
    betas = list(t.adam_betas)
    checks = [
        (t.precision in ("fp32", "bf16", "fp16"), "trainer.precision", f"choose fp32, bf16 or fp16, got {t.precision!r}"),
        (t.scheduler in ("linear", "cosine", "constant"), "trainer.scheduler", f"choose linear, cosine or constant, got {t.scheduler!r}"),
        (t.lr > 0, "trainer.lr", f"must be positive, got {t.lr}"),
        (0 <= t.seed < 2**32, "trainer.seed", f"must be in [0, 2^32), got {t.seed}"),
        (t.micro_batch_size > 0, "trainer.micro_batch_size", f"must be positive, got {t.micro_batch_size}"),
        (t.grad_accum > 0, "trainer.grad_accum", f"must be positive, got {t.grad_accum}"),
        (t.eval_batch_size > 0, "trainer.eval_batch_size", f"must be positive, got {t.eval_batch_size}"),
        (t.max_steps >= -1, "trainer.max_steps", f"give a positive step count, or -1 to train trainer.epochs; got {t.max_steps}"),
        (t.epochs >= 0, "trainer.epochs", f"must be 0 or more, got {t.epochs}"),
        (t.max_steps > 0 or t.epochs > 0, "trainer.epochs", "set trainer.max_steps or trainer.epochs above 0"),
        (0 <= t.warmup_ratio < 1, "trainer.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}"),
        (t.warmup_steps >= 0, "trainer.warmup_steps", f"must be 0 or more, got {t.warmup_steps}"),
        (len(betas) == 2, "trainer.adam_betas", "give two values, e.g. [0.9,0.999]"),
        (all(0 <= b < 1 for b in betas), "trainer.adam_betas", f"each must be in [0, 1), got {betas}; e.g. [0.9,0.999]"),
        (t.adam_eps > 0, "trainer.adam_eps", f"must be positive, got {t.adam_eps}"),
        (t.weight_decay >= 0, "trainer.weight_decay", f"must be 0 or more, got {t.weight_decay}"),
        (t.max_grad_norm >= 0, "trainer.max_grad_norm", f"must be 0 (no clipping) or positive, got {t.max_grad_norm}"),
        (t.max_nonfinite_skips >= 0, "trainer.max_nonfinite_skips", f"must be 0 or more, got {t.max_nonfinite_skips}"),
        (t.num_beams >= 1, "trainer.num_beams", f"must be at least 1 (1: greedy), got {t.num_beams}"),
        (t.eval_every >= 0, "trainer.eval_every", f"must be 0 (only at the end) or positive, got {t.eval_every}"),
        (t.generate_every >= 0, "trainer.generate_every", f"must be 0 or positive, got {t.generate_every}"),
        (t.early_stopping_patience >= 0, "trainer.early_stopping_patience", f"must be 0 (off) or positive, got {t.early_stopping_patience}"),
        (t.save_every >= 0, "trainer.save_every", f"must be 0 (only at the end) or positive, got {t.save_every}"),
        (t.save_total_limit >= 0, "trainer.save_total_limit", f"must be 0 (keep all) or positive, got {t.save_total_limit}"),
        (t.log_every >= 0, "trainer.log_every", f"must be 0 or more, got {t.log_every}"),
        (t.num_processes is None or t.num_processes >= 1, "trainer.num_processes", f"must be at least 1 (or null), got {t.num_processes}"),
        (cfg.task.max_new_tokens >= 1, "task.max_new_tokens", f"must be at least 1, got {cfg.task.max_new_tokens}"),
        (t.early_stopping_patience == 0 or t.eval_every > 0, "trainer.early_stopping_patience",
         "early stopping needs dev evaluations: set trainer.eval_every"),
        (t.generate_every == 0 or (t.eval_every > 0 and t.generate_every % t.eval_every == 0),
         "trainer.generate_every", "generation runs at dev evaluations: make it a multiple of trainer.eval_every"),
        (cfg.task.max_length > 1, "task.max_length", f"must be at least 2, got {cfg.task.max_length}"),
        (t.strategy in ("ddp", "fsdp"), "trainer.strategy", f"choose ddp or fsdp, got {t.strategy!r}"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(key, message)
    if t.precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.precision", "fp16 needs a GPU; use bf16 or fp32 on a CPU")
    check_trackers(t.report_to)


# trainer.report_to: Accelerate's trackers, each with the modules that provide it (any one) and
# the pip extra of ours that installs it where there is one.
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "peftrun[tensorboard]"),
    "wandb": (("wandb",), "peftrun[wandb]"),
    "mlflow": (("mlflow",), "peftrun[mlflow]"),
    "comet_ml": (("comet_ml",), "comet_ml"), "aim": (("aim",), "aim"), "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"), "swanlab": (("swanlab",), "swanlab"), "trackio": (("trackio",), "trackio"),
}


def check_trackers(report_to: Any) -> None:
    """Every tracker of trainer.report_to is one Accelerate knows, and its package is installed."""
    import importlib.util

    if not isinstance(report_to, (str, list, ListConfig)) and report_to is not None:
        raise ConfigError("trainer.report_to", f"give a list of trackers, e.g. [tensorboard], got {report_to!r}")
    for name in tracker_names(SimpleNamespace(report_to=report_to)):
        if name not in TRACKERS:
            raise ConfigError("trainer.report_to", f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        modules, extra = TRACKERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError("trainer.report_to", f"{name} is not installed; pip install '{extra}' "
                                                   f"(or drop it from trainer.report_to)")


def check_positions(cfg: DictConfig, model) -> None:
    """task.max_length within the positions of a backbone that learned one embedding per
    position (GPT-2's wpe: a longer sequence has no position to look up). Rotary backbones
    (Llama, Qwen, ...) compute any position; their max_position_embeddings is not a limit here."""
    import torch

    config = model.config
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or cfg.task.max_length <= positions:
        return
    tokens = model.get_input_embeddings()
    learned = [m for m in model.modules()
               if isinstance(m, torch.nn.Embedding) and m is not tokens and m.num_embeddings >= positions]
    if learned:
        raise ConfigError("task.max_length", f"{cfg.task.max_length} is beyond the {positions} positions "
                          f"of the model; set task.max_length={positions} or less")


def run_length(trainer: Any, steps_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps, warm-up steps) of a run over `steps_per_epoch` steps an epoch."""
    total = trainer.max_steps if trainer.max_steps > 0 else max(1, math.ceil(trainer.epochs * steps_per_epoch))
    warmup = trainer.warmup_steps if trainer.warmup_steps > 0 else int(trainer.warmup_ratio * total)
    return total, warmup


def world_size(cfg: DictConfig) -> int:
    return int(os.environ.get("WORLD_SIZE") or cfg.trainer.num_processes or 1)


def check_batch(cfg: DictConfig, num_examples: int, world: int) -> int:
    """Steps per epoch of `num_examples` in global batches; a batch larger than the data is refused."""
    t = cfg.trainer
    global_batch = t.micro_batch_size * t.grad_accum * world
    if num_examples // global_batch == 0:
        raise ConfigError(
            "trainer.micro_batch_size",
            f"a global batch of {global_batch} (micro_batch_size x grad_accum x processes) "
            f"exceeds the {num_examples} training examples; lower it",
        )
    return num_examples // global_batch


def check_run(cfg: DictConfig, task: Task, method: Method) -> None:
    """The run's length against the data and the method (ALoRA's schedule must fit), from the
    training examples before tokenizing (the loop checks again on what tokenizing kept). Skipped
    for data read from the Hub (the load reports itself)."""
    if getattr(task, "reads_hub", False):
        return
    steps_per_epoch = check_batch(cfg, len(task.examples("train")), world_size(cfg))
    method.check_run(run_length(cfg.trainer, steps_per_epoch)[0], steps_per_epoch)


# ----------------------------------------------------------------------------- where a run starts
def check_init_from(cfg: DictConfig, model) -> None:
    """trainer.init_from names a saved adapter of the run's method whose tensors have the names
    and shapes of the adapter this run attaches (compared on the meta-device `model`, which this
    changes)."""
    from safetensors import safe_open

    from .methods import ADAPTER_WEIGHTS
    from .multitenant import locate_adapter

    path = cfg.trainer.init_from
    if not path:
        return
    key = "trainer.init_from"
    try:
        saved = locate_adapter("init", path)
    except ConfigError as e:
        raise ConfigError(key, e.message) from None
    if saved.method != cfg.method.name:
        raise ConfigError(key, f"{saved.folder} holds a {saved.method} adapter and this run trains "
                               f"{cfg.method.name}; start from a {cfg.method.name} adapter, or set method={saved.method}")
    try:
        with safe_open(str(saved.folder / ADAPTER_WEIGHTS), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # noqa: BLE001  (missing, truncated, not safetensors)
        raise ConfigError(key, f"{saved.folder / ADAPTER_WEIGHTS} does not read ({type(e).__name__}); give a "
                               f"folder that holds a complete saved adapter") from None
    try:
        expected = {name: tuple(t.shape) for name, t in build_method(cfg.method).attach(model).state_dict().items()}
    except Exception:  # noqa: BLE001  (a method that cannot attach on the meta device: the run checks)
        return
    options = "the method's options (method.r, method.targets, ...) and the backbone"
    for name in sorted(set(expected) | set(shapes)):
        if name not in shapes:
            raise ConfigError(key, f"{saved.folder} does not fit this run's adapter: it has no tensor {name}; "
                                   f"{options} must be those it was trained with")
        if name not in expected:
            raise ConfigError(key, f"{saved.folder} does not fit this run's adapter: its tensor {name} has no "
                                   f"place here; {options} must be those it was trained with")
        if shapes[name] != expected[name]:
            raise ConfigError(key, f"{saved.folder} does not fit this run's adapter: {name} is "
                                   f"{list(shapes[name])} there and {list(expected[name])} here; {options} must "
                                   f"be those it was trained with")


def check_resume_from(cfg: DictConfig) -> None:
    """trainer.resume_from, where it exists, is a complete checkpoint of a run with this config
    (one that is gone is left to the run folder's check: the run may have saved newer ones since
    it resumed from it)."""
    from pathlib import Path

    from .train.resume_point import check_chosen

    path = cfg.trainer.resume_from
    if not path:
        return
    folder = Path(path).expanduser().absolute()
    if folder.exists():
        check_chosen(folder, cfg)


def validate(cfg: DictConfig, *, keep: bool = False) -> Prepared:
    """Every check that needs no weights; returns what it built. `keep`: also remember the result
    for `validated(cfg)` later in this process."""
    check_keys(cfg)
    check_finite(cfg)
    check_trainer(cfg)
    validate_model_config(cfg.model)
    check_sharding(cfg)
    method = build_method(cfg.method)
    method.check_config()
    task = build_task(cfg.task)
    task.validate()
    tokenizer = load_tokenizer(cfg.model)
    bind_tokenizer(task, tokenizer)  # a chat task renders every conversation it uses
    model = meta_model(cfg.model, tokenizer)
    method.check_model(model)
    check_positions(cfg, model)
    if cfg.trainer.packing:
        check_packing(model, cfg.model.attn_implementation)  # the backbone keeps packed examples apart
    check_run(cfg, task, method)
    check_init_from(cfg, model)
    check_resume_from(cfg)
    prepared = Prepared(cfg, task, tokenizer, method)
    if keep:
        _kept[_key(cfg)] = prepared
    return prepared


def validated(cfg: DictConfig) -> Prepared:
    """The result of an earlier `validate(..., keep=True)` of the same resolved config in this
    process (handed out once: a second run of the config builds afresh), else `validate(cfg)`."""
    kept = _kept.pop(_key(cfg), None)
    return kept if kept is not None else validate(cfg)


_kept: dict[str, Prepared] = {}


def _key(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True)
