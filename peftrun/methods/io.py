"""Saving and loading adapters: the tensors as safetensors, the method config and state as JSON."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from .base import DEFAULT_ADAPTER, Adapter
from .registry import METHODS, build_method

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, replacing an existing `dst` with no moment where neither exists
    complete: the old one is moved aside first and removed last."""
    old = dst.with_name(f".old-{dst.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_folder_atomically(folder: str | os.PathLike, tensors: dict[str, Any], config: dict[str, Any]) -> Path:
    """`tensors` (safetensors) and `config` (JSON) into `folder`, written as a temporary sibling
    and renamed into place, so a kill never leaves half a folder."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    replace_dir(tmp, folder)
    return folder


def save_adapter(adapter: Adapter, folder: str | os.PathLike, metadata: dict[str, Any] | None = None,
                 tensors: dict[str, Any] | None = None) -> Path:
    """Write the adapter into `folder` atomically. `tensors`: its state_dict() taken beforehand
    (sharded runs gather it on every process)."""
    tensors = adapter.state_dict() if tensors is None else tensors
    config = {"method": adapter.method, "config": adapter.config_dict(), "state": adapter.extra_state()}
    config.update(metadata or {})
    return write_folder_atomically(folder, tensors, config)


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise ConfigError("adapter", f"{folder} holds no {ADAPTER_CONFIG}; point it at a saved adapter folder")
    return json.loads(path.read_text())


def load_adapter(folder: str | os.PathLike, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> Adapter:
    """Attach the adapter saved in `folder` to `model` and load its tensors."""
    saved = read_adapter_config(folder)
    cfg = dict(saved["config"])
    cfg.pop("target_modules", None)
    if cfg.get("name") not in METHODS:
        raise ConfigError("adapter", f"{folder} holds an adapter of unknown method {cfg.get('name')!r}")
    schema = OmegaConf.structured(METHODS[cfg["name"]].config_class)
    adapter = build_method(OmegaConf.merge(schema, cfg)).attach(model, adapter_name=adapter_name)
    adapter.load_state_dict(load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    adapter.load_extra_state(saved.get("state", {}))
    return adapter
