"""Parameter-efficient methods, one package each, and what they share: the contract with
defaults (base.py), the registry (registry.py), saving and loading adapters (io.py).

Importing this package registers every shipped method."""

# Each registers itself; this order is the order `method=` options are listed in.
from . import lora, tied_lora, alora, para, iapt  # noqa: F401, I001
from .base import DEFAULT_ADAPTER, Adapter, AdapterLayer, Method
from .io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter_config, replace_dir, save_adapter
from .registry import METHODS, build_method, method_class, register_method

__all__ = ["Adapter", "AdapterLayer", "Method", "METHODS", "DEFAULT_ADAPTER", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS",
           "build_method", "method_class", "register_method", "save_adapter", "load_adapter",
           "read_adapter_config", "replace_dir"]
