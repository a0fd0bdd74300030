"""Exports: an adapter in Hugging Face PEFT's format, or merged into a plain backbone.

`export_peft` writes `adapter_model.safetensors` + `adapter_config.json` that
`peft.PeftModel.from_pretrained(backbone, folder)` loads. A method opts in by giving its adapter
a `peft_state()` method returning `(peft_config, tensors)`:

* `peft_config`: the fields of the PEFT config class, `peft_type` included (e.g. "LORA"); the
  exporter adds `base_model_name_or_path` and, unless given, `task_type` ("CAUSAL_LM");
* `tensors`: keyed as in PEFT's file, `base_model.model.<module>.<tensor>` with no adapter name.

`merge_into_backbone` folds the adapter into the backbone weights and removes the adapter's
modules, so `model.save_pretrained` writes a checkpoint that loads without peftrun or PEFT.
peft is not imported here: it is not a runtime dependency.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from .methods import ADAPTER_CONFIG, ADAPTER_WEIGHTS, replace_dir
from .methods.base import Adapter

PEFT_TASK_TYPE = "CAUSAL_LM"


def export_peft(adapter: Adapter, model_name_or_path: str, folder: str | os.PathLike) -> Path:
    """Write `adapter` into `folder` in PEFT's format (atomically: a temporary sibling, then a
    rename). `model_name_or_path` is the backbone PEFT should load it onto (a Hub id or folder)."""
    peft_state = getattr(adapter, "peft_state", None)
    if peft_state is None:
        raise ValueError(
            f"method {adapter.method!r} has no Hugging Face PEFT export yet; "
            "save it with peftrun's own format (save_adapter) or merge it (merge_into_backbone)"
        )
    config, tensors = peft_state()
    config = dict(config)
    if "peft_type" not in config:
        raise ValueError(f"{type(adapter).__name__}.peft_state() gave a config without peft_type")
    config.setdefault("task_type", PEFT_TASK_TYPE)
    config["base_model_name_or_path"] = model_name_or_path
    bad = [k for k in tensors if not k.startswith("base_model.model.")]
    if bad:
        raise ValueError(f"PEFT tensor names start with 'base_model.model.', got {bad[:3]}")

    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    replace_dir(tmp, folder)
    return folder


def merge_into_backbone(adapter: Adapter, model: nn.Module) -> nn.Module:
    """Merge `adapter` into `model`'s weights and replace its wrappers by the layers they wrap;
    returns `model` (changed in place). The adapter is unusable afterwards.

    A method may provide `unload(model)` (merge and strip, returning the model) of its own;
    LoRA is handled here. Quantized backbones cannot be merged (the adapter's merge refuses)."""
    unload = getattr(adapter, "unload", None)
    if unload is not None:
        return unload(model)
    if not adapter.supports_merge:  # before "yet": a non-linear method never will be
        raise ValueError(f"method {adapter.method!r} does not support merging")
    if adapter.method != "lora":
        raise ValueError(f"method {adapter.method!r} cannot be merged into the backbone yet")
    from .methods.lora import LoraLinear

    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    own = {id(layer) for layer in adapter.layers.values()}
    for name, layer in wrappers:
        if id(layer) not in own:
            raise ValueError(f"{name} holds a LoRA layer that is not this adapter's; cannot strip it")
        others = sorted(set(layer.lora_A) - {adapter.name})
        if others:
            raise ValueError(
                f"{name} also holds adapter(s) {others}; stripping the wrapper would drop them"
            )
    adapter.merge()  # raises (before changing anything) on a quantized backbone
    for name, layer in wrappers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    adapter.layers.clear()
    return model


__all__ = ["export_peft", "merge_into_backbone"]
