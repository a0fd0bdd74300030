"""Multi-tenant inference: one backbone, several adapters, and batches whose requests each name
their adapter. `Router` gives each adapter method the batch rows it owns; `generate_mixed` serves
(prompt, adapter name) requests in shared batches; `load_tenants` rebuilds the backbone that saved
adapters were trained on (refusing adapters that cannot share one) and attaches each under its
name. The `peftrun-generate` command on top of them is `peftrun.serve`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import ConfigError
from .generate import generate


class Router:
    """Mixed-tenant batches over adapters of several methods on one backbone. An adapter's
    `routing` covers every adapter of its family (LoRA and ALoRA share their layers); the router
    gives each family the rows it owns and None (the backbone) elsewhere, so a row goes
    through exactly one adapter."""

    def __init__(self, adapters: Iterable[Any]):
        by_family: dict[str, Any] = {}  # one adapter per family speaks for all of it
        for adapter in adapters:
            by_family.setdefault(adapter.family, adapter)
        self.families = list(by_family.values())
        self.owners: dict[str, Any] = {}  # adapter name -> the adapter whose routing covers it
        for family in self.families:
            for name in family.tenants():
                owner = self.owners.setdefault(name, family)
                if owner is not family:
                    raise ValueError(f"two adapters on this model are named {name!r} ({owner.method} and "
                                     f"{family.method}); load them under names of their own")

    def tenants(self) -> list[str]:
        return list(self.owners)

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None, segment_ids: torch.Tensor | None = None) -> None:
        for family in self.families:
            family.set_prompt_mask(prompt_mask, segment_ids)

    @contextlib.contextmanager
    def routing(self, names: Sequence[str | None]):
        unknown = [n for n in names if n is not None and n not in self.owners]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r} on this model (have: {', '.join(self.owners)})")
        with contextlib.ExitStack() as stack:
            for family in self.families:
                stack.enter_context(family.routing([n if n is not None and self.owners[n] is family else None
                                                    for n in names]))
            yield


@torch.no_grad()
def generate_mixed(
    model,
    tokenizer,
    router: Any,
    requests: Sequence[tuple[str, str | None]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    num_beams: int = 1,
    max_prompt_length: int = 256,
) -> list[str]:
    """Completions of (prompt, adapter name) requests in shared batches: `router.routing(names)`
    sends each batch row through its request's adapter (None: the backbone). `router` is an
    adapter (its routing covers every adapter of its method on the backbone), a Router, or a
    list of adapters (of one method or several). Beams of a request share its adapter."""
    if isinstance(router, (list, tuple)):
        router = Router(router)
    outputs: list[str] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        names = [name for _, name in chunk for _ in range(num_beams)]
        with router.routing(names):
            outputs += generate(model, tokenizer, router, [prompt for prompt, _ in chunk], batch_size=len(chunk),
                                max_new_tokens=max_new_tokens, num_beams=num_beams,
                                max_prompt_length=max_prompt_length)
    return outputs


# ----------------------------------------------------------------------------- saved adapters on one backbone
# What makes two backbones the same one (dtype, quantization and attention kernel may differ).
BACKBONE_KEYS = ("name", "name_or_path", "build", "revision", "tokenizer")


@dataclass
class SavedAdapter:
    name: str
    folder: Path  # holds adapter_config.json and the tensors
    method: str
    base_model: str | None  # the backbone's model.name, as saved with the adapter
    model_config: dict | None  # the `model` section of the run's config.yaml (None: not found)
    task_config: dict | None


def locate_adapter(name: str, path: str | os.PathLike) -> SavedAdapter:
    """A saved adapter from a run folder (its adapter/), a checkpoint folder or an adapter
    folder, with the config.yaml of the run that trained it (next to it or one level up)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("adapter", f"{path} does not exist; give a run folder (outputs/RUN) or a saved adapter folder")
    from omegaconf import OmegaConf

    from .methods import ADAPTER_CONFIG, read_adapter_config

    folder = path if (path / ADAPTER_CONFIG).is_file() else path / "adapter"
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ConfigError("adapter", f"{path} holds no saved adapter (no {ADAPTER_CONFIG} in it or in adapter/); "
                                     f"give the folder of a run that finished, or an adapter folder")
    saved = read_adapter_config(folder)
    config = next((d / "config.yaml" for d in (folder, folder.parent) if (d / "config.yaml").is_file()), None)
    model_cfg = task_cfg = None
    if config is not None:
        run = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        model_cfg, task_cfg = run.get("model"), run.get("task")
    return SavedAdapter(name, folder, str(saved.get("method")), saved.get("base_model"), model_cfg, task_cfg)


def check_compatible(adapters: list[SavedAdapter]) -> dict:
    """The backbone config every adapter was trained on; refuses adapters of different
    backbones, adapters whose backbone is unknown, and methods that cannot share one."""
    if not adapters:
        raise ConfigError("adapter", "give a run folder or --adapter NAME=DIR: there is no backbone to build")
    names = [a.name for a in adapters]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError("adapter", f"the name {repeated[0]!r} is given twice; name each adapter once")
    from .methods import method_class

    # Families that wrap the backbone's projections cannot share it (one wrapper cannot hold
    # another family's adapters); LoRA and ALoRA are one family, PARA and IAPT use hooks.
    classes = [method_class(a.method, "adapter").adapter_class for a in adapters]
    wrappers = sorted({c.family for c in classes if c.wraps_projections})
    if len(wrappers) > 1:
        raise ConfigError("adapter", f"{' and '.join(wrappers)} adapters cannot share one backbone (both wrap "
                                     f"the attention projections); serve them in separate runs")
    configured = [a for a in adapters if a.model_config is not None]
    if not configured:
        raise ConfigError("adapter", f"no config.yaml next to {adapters[0].folder} or its parent, so its "
                                     f"backbone is unknown; give the run folder")
    first = configured[0]

    def identity(model: dict) -> dict:
        return {k: model.get(k) for k in BACKBONE_KEYS}

    for a in adapters:
        if a.model_config is None:
            if a.base_model is None or a.base_model != first.model_config.get("name"):
                raise ConfigError("adapter", f"{a.name} ({a.folder}) has no config.yaml near it and was saved "
                                             f"for backbone {a.base_model!r}, not {first.model_config.get('name')!r}; "
                                             f"give its run folder")
        elif identity(a.model_config) != identity(first.model_config):
            diff = next(k for k in BACKBONE_KEYS if a.model_config.get(k) != first.model_config.get(k))
            raise ConfigError("adapter", f"{a.name} ({a.folder}) was trained on another backbone than "
                                         f"{first.name} (model.{diff}: {a.model_config.get(diff)!r} vs "
                                         f"{first.model_config.get(diff)!r}); one batch needs one backbone")
    return first.model_config


def load_tenants(adapters: dict[str, str | os.PathLike], device: str | torch.device | None = None,
                 trust_remote_code: bool = False):
    """Rebuild the backbone the saved adapters were trained on and attach each under its name.
    `adapters` maps a name to a run, checkpoint or adapter folder. Returns (model, tokenizer,
    router, task config of the first run or None); `generate_mixed(model, tokenizer, router,
    [(prompt, name), ...])` then serves them in shared batches. A backbone runs code of its own
    only with `trust_remote_code` (the caller's choice): a run folder's config.yaml is data, and
    its `model.trust_remote_code` is ignored."""
    from omegaconf import OmegaConf

    from .config import ModelConfig
    from .methods import load_adapter, method_class
    from .models import build_model, load_tokenizer

    saved = [locate_adapter(name, path) for name, path in adapters.items()]
    model_section = check_compatible(saved)
    try:
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_section)
    except Exception as e:  # a config.yaml from an incompatible peftrun version
        raise ConfigError("model", f"the run's model config does not load ({' '.join(str(e).split())})") from e
    model_cfg.trust_remote_code = bool(trust_remote_code)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(model_cfg)
    model = build_model(model_cfg, tokenizer, device=device)
    if model_cfg.quantization is None:
        model.to(device)
    loaded = []
    for a in sorted(saved, key=lambda a: method_class(a.method, "adapter").attach_order):
        try:
            loaded.append(load_adapter(a.folder, model, adapter_name=a.name))
        except ValueError as e:  # tensors that do not fit this backbone
            raise ConfigError("adapter", f"{a.name} ({a.folder}) does not fit the backbone: {e}") from e
    task = next((a.task_config for a in saved if a.task_config is not None), None)
    return model, tokenizer, Router(loaded), task
