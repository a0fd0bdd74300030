"""Parameter-efficient methods, one package each, and what they share: the contract with
defaults (base.py), the registry (registry.py), saving and loading adapters (io.py).

Importing this package imports every method package beside `common/`, and each registers
itself: adding a method is adding its folder (and its peftrun/conf/method/<name>.yaml)."""

import importlib
import pkgutil

from .base import DEFAULT_ADAPTER, Adapter, AdapterLayer, Method
from .io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter_config, replace_dir, save_adapter
from .registry import METHODS, build_method, method_class, register_method

METHOD_PACKAGES = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg and m.name != "common")
for _name in METHOD_PACKAGES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["Adapter", "AdapterLayer", "Method", "METHODS", "DEFAULT_ADAPTER", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS",
           "build_method", "method_class", "register_method", "save_adapter", "load_adapter",
           "read_adapter_config", "replace_dir", "METHOD_PACKAGES"]
