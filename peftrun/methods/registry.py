"""The method registry: name -> Method class. A method joins with `@register_method` on its
Method class, which also registers its config dataclass as the Hydra schema `<name>_schema`
(peftrun/conf/method/<name>.yaml starts from it)."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore

from ..errors import ConfigError
from .base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two methods are named {cls.name!r}: {METHODS[cls.name].__module__} and {cls.__module__}")
    METHODS[cls.name] = cls
    ConfigStore.instance().store(group="method", name=f"{cls.name}_schema", node=cls.config_class)
    return cls


def method_class(name: str, key: str = "method.name") -> type[Method]:
    if name not in METHODS:
        raise ConfigError(key, f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg: Any) -> Method:
    """The method `cfg` (a `method.*` config) describes."""
    return method_class(cfg.name)(cfg)
