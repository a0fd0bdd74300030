"""Every check that needs no weights, once: config values, files, targets on a meta-device model.

`validate(cfg)` raises a ConfigError (one line, naming the key) or returns what it built on the
way — the task, the tokenizer and the method — as a `Prepared`, which the run then uses instead
of building them again. The command line validates before Hydra creates the run folder and
Hydra's job validates again; `validate(cfg, keep=True)` / `validated(cfg)` make the second one,
in the same process and for the same resolved config, take the first one's result. A job started
in another process (a submitit sweep) validates once, there.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from .distributed import check_sharding
from .errors import ConfigError
from .methods import build_method
from .methods.base import Method
from .models import load_tokenizer, meta_model, validate_model_config
from .tasks import Task, build_task


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
        return cls(cfg, build_task(cfg.task), load_tokenizer(cfg.model), build_method(cfg.method))


def check_trainer(cfg: DictConfig) -> None:
    """The trainer's values (and the task's length), each against its allowed range."""
    t = cfg.trainer
    checks = [
        (t.precision in ("fp32", "bf16", "fp16"), "trainer.precision", f"choose fp32, bf16 or fp16, got {t.precision!r}"),
        (t.scheduler in ("linear", "cosine", "constant"), "trainer.scheduler", f"choose linear, cosine or constant, got {t.scheduler!r}"),
        (t.lr > 0, "trainer.lr", f"must be positive, got {t.lr}"),
        (t.micro_batch_size > 0, "trainer.micro_batch_size", f"must be positive, got {t.micro_batch_size}"),
        (t.grad_accum > 0, "trainer.grad_accum", f"must be positive, got {t.grad_accum}"),
        (t.eval_batch_size > 0, "trainer.eval_batch_size", f"must be positive, got {t.eval_batch_size}"),
        (t.max_steps > 0 or t.epochs > 0, "trainer.epochs", "set trainer.max_steps or trainer.epochs above 0"),
        (0 <= t.warmup_ratio < 1, "trainer.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}"),
        (len(t.adam_betas) == 2, "trainer.adam_betas", "give two values, e.g. [0.9,0.999]"),
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


def validate(cfg: DictConfig, *, keep: bool = False) -> Prepared:
    """Every check that needs no weights; returns what it built. `keep`: also remember the result
    for `validated(cfg)` later in this process."""
    check_trainer(cfg)
    validate_model_config(cfg.model)
    check_sharding(cfg)
    method = build_method(cfg.method)
    method.check_config()
    task = build_task(cfg.task)
    task.validate()
    tokenizer = load_tokenizer(cfg.model)
    method.check_model(meta_model(cfg.model, tokenizer))
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
