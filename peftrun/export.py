"""Exports: an adapter in Hugging Face PEFT's format, or merged into a plain backbone.

`export_peft` writes `adapter_model.safetensors` + `adapter_config.json` that
`peft.PeftModel.from_pretrained(backbone, folder)` loads. A method opts in by overriding its
adapter's `peft_state()` (peftrun.methods.base.Adapter), returning `(peft_config, tensors)`:

* `peft_config`: the fields of the PEFT config class, `peft_type` included (e.g. "LORA"); the
  exporter adds `base_model_name_or_path` and, unless given, `task_type` ("CAUSAL_LM");
* `tensors`: keyed as in PEFT's file, `base_model.model.<module>.<tensor>` with no adapter name.

`merge_into_backbone` folds the adapter into the backbone weights and removes the adapter's
modules (the adapter's `unload`), so `model.save_pretrained` writes a checkpoint that loads
without peftrun or PEFT.
peft is not imported here: it is not a runtime dependency.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .methods import Adapter
from .methods.io import write_folder_atomically

PEFT_TASK_TYPE = "CAUSAL_LM"


def export_peft(adapter: Adapter, model_name_or_path: str, folder: str | os.PathLike) -> Path:
    """Write `adapter` into `folder` in PEFT's format (atomically: a temporary sibling, then a
    rename). `model_name_or_path` is the backbone PEFT should load it onto (a Hub id or folder)."""
    config, tensors = adapter.peft_state()  # refuses for a method without a PEFT form
    config = dict(config)
    if "peft_type" not in config:
        raise ValueError(f"{type(adapter).__name__}.peft_state() gave a config without peft_type")
    config.setdefault("task_type", PEFT_TASK_TYPE)
    config["base_model_name_or_path"] = model_name_or_path
    bad = [k for k in tensors if not k.startswith("base_model.model.")]
    if bad:
        raise ValueError(f"PEFT tensor names start with 'base_model.model.', got {bad[:3]}")
    return write_folder_atomically(folder, {k: t.detach().contiguous().cpu() for k, t in tensors.items()}, config)


def merge_into_backbone(adapter: Adapter, model: nn.Module) -> nn.Module:
    """Merge `adapter` into `model`'s weights and replace its wrappers by the layers they wrap;
    returns `model` (changed in place). The adapter is unusable afterwards. Quantized backbones
    and non-linear methods (PARA, IAPT) are refused before anything changes."""
    return adapter.unload(model)


__all__ = ["export_peft", "merge_into_backbone"]
