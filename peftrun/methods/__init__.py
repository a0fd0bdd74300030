"""Method registry, and saving/loading adapters (safetensors tensors + a JSON config)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from ..config import AloraConfig, IaptConfig, LoraConfig, ParaConfig, TiedLoraConfig
from ..errors import ConfigError
from .alora import AloraMethod
from .base import Adapter, Method
from .iapt import IaptMethod
from .lora import LoraMethod
from .para import ParaMethod
from .tied_lora import TiedLoraMethod

# name -> (method class, config schema)
METHODS: dict[str, tuple[type, type]] = {
    "lora": (LoraMethod, LoraConfig),
    "tied_lora": (TiedLoraMethod, TiedLoraConfig),
    "alora": (AloraMethod, AloraConfig),
    "para": (ParaMethod, ParaConfig),
    "iapt": (IaptMethod, IaptConfig),
}

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def build_method(cfg: Any) -> Method:
    if cfg.name not in METHODS:
        raise ConfigError("method.name", f"unknown method {cfg.name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.name][0](cfg)


def save_adapter(adapter: Adapter, folder: str | os.PathLike, metadata: dict[str, Any] | None = None,
                 tensors: dict[str, Any] | None = None) -> Path:
    """Write the adapter into `folder` atomically (a temporary sibling, then a rename).
    `tensors`: its state_dict() taken beforehand (sharded runs gather it on every process)."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = adapter.state_dict() if tensors is None else tensors
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"method": adapter.method, "config": adapter.config_dict(), "state": adapter.extra_state()}
    config.update(metadata or {})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    replace_dir(tmp, folder)
    return folder


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, replacing an existing `dst` with no moment where neither exists
    complete: the old one is moved aside first and removed last."""
    old = dst.with_name(f".old-{dst.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise ConfigError("adapter", f"{folder} holds no {ADAPTER_CONFIG}; point it at a saved adapter folder")
    return json.loads(path.read_text())


def load_adapter(folder: str | os.PathLike, model: nn.Module, adapter_name: str = "default") -> Adapter:
    """Attach the adapter saved in `folder` to `model` and load its tensors."""
    from omegaconf import OmegaConf

    saved = read_adapter_config(folder)
    cfg = dict(saved["config"])
    cfg.pop("target_modules", None)
    if cfg.get("name") not in METHODS:
        raise ConfigError("adapter", f"{folder} holds an adapter of unknown method {cfg.get('name')!r}")
    schema = OmegaConf.structured(METHODS[cfg["name"]][1])
    method = build_method(OmegaConf.merge(schema, cfg))
    adapter = method.attach(model, adapter_name=adapter_name)
    adapter.load_state_dict(load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    adapter.load_extra_state(saved.get("state", {}))
    return adapter


__all__ = ["Adapter", "Method", "METHODS", "build_method", "save_adapter", "load_adapter", "replace_dir"]
