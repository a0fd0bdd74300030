"""A backbone's config checked before any weights load: the values of `model.*`, a local folder
that must exist, the architecture of a built model, the attention kernel, bitsandbytes."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch

from peftrun.config import ModelConfig
from peftrun.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = (None, "nf4", "int8")
ARCHS = ("llama", "gpt2")


def _bitsandbytes_available() -> bool:
    try:
        with _quiet_import("bitsandbytes", "kernels"):
            import bitsandbytes  # noqa: F401
    except Exception:  # a broken install (missing CUDA libs...) fails in other ways than ImportError
        return False
    return True


@contextlib.contextmanager
def _quiet_import(*loggers: str) -> Iterator[None]:
    """Import a package without the lines it prints about itself (bitsandbytes logs warnings
    about optional kernels at import): a refusal that follows must be the only line printed."""
    import io
    import warnings

    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def attention_implementations() -> list[str]:
    """The values model.attn_implementation may take here: eager and every kernel transformers
    registered (sdpa, flash_attention_2, flex_attention, ...)."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        registered = list(ALL_ATTENTION_FUNCTIONS.keys())
    except Exception:  # another transformers layout: accept the classic ones
        registered = ["sdpa", "flash_attention_2", "flex_attention"]
    return ["eager", *[name for name in registered if "|" not in name]]


def check_attn_implementation(cfg: ModelConfig) -> None:
    """An attention kernel transformers does not know, or one whose package is missing."""
    impl = cfg.attn_implementation
    if impl is None or "/" in impl:  # null: transformers' default; "org/repo": a Hub kernel
        return
    known = attention_implementations()
    if impl not in known:
        raise ConfigError("model.attn_implementation",
                          f"unknown attention {impl!r}; choose one of {' | '.join(known)} or null")
    if impl.startswith("flash_attention_"):  # flash_attention_2/3/4: a package and a GPU
        import transformers.utils

        available = getattr(transformers.utils, f"is_flash_attn_{impl.rsplit('_', 1)[-1]}_available", None)
        if available is not None and not available():
            raise ConfigError("model.attn_implementation", f"{impl} needs its flash-attn package and a "
                              f"GPU, not found here; try model.attn_implementation=sdpa")


def validate_model_config(cfg: ModelConfig) -> None:
    """Checks that need no weights; raise ConfigError naming the key at fault."""
    if cfg.name_or_path is None and cfg.build is None:
        raise ConfigError(
            "model.name_or_path", "set a Hub id or a local folder, or pick a built model (e.g. model=tiny)"
        )
    if cfg.name_or_path is not None and cfg.build is not None:
        raise ConfigError(
            "model.build", "set either model.name_or_path or model.build, not both (e.g. model.build=null)"
        )
    check_local_folder(cfg)
    if cfg.dtype not in DTYPES:
        raise ConfigError("model.dtype", f"{cfg.dtype!r} is not one of {' | '.join(DTYPES)}")
    if cfg.quantization not in QUANTIZATIONS:
        raise ConfigError("model.quantization", f"{cfg.quantization!r} is not one of null | nf4 | int8")
    if cfg.quantization is not None and not _bitsandbytes_available():
        raise ConfigError(
            "model.quantization", "needs bitsandbytes: pip install bitsandbytes, or set model.quantization=null"
        )
    check_attn_implementation(cfg)
    if cfg.bnb_4bit_compute_dtype not in DTYPES:
        raise ConfigError(
            "model.bnb_4bit_compute_dtype", f"{cfg.bnb_4bit_compute_dtype!r} is not one of {' | '.join(DTYPES)}"
        )
    if cfg.build is not None:
        _validate_build(cfg.build)


def check_local_folder(cfg: ModelConfig) -> None:
    """A `name_or_path` that must be a folder on disk and is not: say so, and how to make it.

    It must be local when the config names the command that creates it (`create_command`, e.g.
    model=tiny_pretrained) or when no Hub id can look like it (absolute, ~, ./ or ../); the Hub
    client would otherwise report a connection or repo-id error that hides the real cause.
    """
    path = cfg.name_or_path
    if path is None:
        return
    create = getattr(cfg, "create_command", None)
    local = path.startswith(("/", "~", "./", "../")) or Path(path).is_absolute()
    if not (create or local) or Path(path).expanduser().exists():
        return
    fix = f"create it with `{create}`" if create else "check the path"
    raise ConfigError("model.name_or_path", f"no folder {path!r}; {fix} (or point model.name_or_path at one)")


def _validate_build(spec) -> None:
    if spec.arch not in ARCHS:
        raise ConfigError("model.build.arch", f"{spec.arch!r} is not one of {' | '.join(ARCHS)}")
    for field in (
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        "max_position_embeddings",
    ):
        value = getattr(spec, field)
        if value <= 0:
            raise ConfigError(f"model.build.{field}", f"must be positive, got {value}")
    if spec.hidden_size % spec.num_heads:
        raise ConfigError(
            "model.build.num_heads",
            f"hidden_size {spec.hidden_size} is not divisible by num_heads {spec.num_heads}",
        )
    if spec.arch == "gpt2" and spec.num_kv_heads != spec.num_heads:
        # Refused rather than ignored: GPT-2 has no grouped-query attention.
        raise ConfigError(
            "model.build.num_kv_heads",
            f"gpt2 has no grouped-query attention; set it to num_heads ({spec.num_heads})",
        )
    if spec.num_heads % spec.num_kv_heads:
        raise ConfigError(
            "model.build.num_kv_heads",
            f"num_heads {spec.num_heads} is not divisible by num_kv_heads {spec.num_kv_heads}",
        )
