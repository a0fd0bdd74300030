"""The LoRA family's export in Hugging Face PEFT's LoRA format (see peftrun/export.py).

On mixture-of-experts models whose checkpoints transformers 5 converts (Qwen2/3-MoE,
DeepSeek-V2/V3, OLMoE, GLM-4-MoE... and Mixtral), PEFT renames LoRA targets on load: every target
module whose last name is a pre-v5 expert name (`gate_proj`, `up_proj`, `down_proj`; Mixtral's
`w1`, `w2`, `w3`) is moved onto the stacked experts. A dense MLP or a shared expert of that name
(DeepSeek's first layers, Qwen2-MoE's shared expert) would lose its adapter. Those modules are
exported as parameter targets instead (`<module>.weight`), which PEFT leaves where they are and
applies identically (its ParamWrapper adds B A to the weight); their tensors keep their names.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

# PEFT's own table (peft/utils/transformers_weight_conversion.py), used where peft is not installed.
_RENAMED = {"mixtral": {"gate", "w1", "w2", "w3"}, "qwen2_moe": {"gate", "gate_proj", "up_proj", "down_proj"}}


def peft_renamed_leaves(model) -> set[str]:
    """Last names of modules PEFT moves onto the experts when it loads a LoRA onto `model`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:
        return set()
    if model_type is None or get_checkpoint_conversion_mapping(model_type) is None:
        return set()
    base = _MODEL_TO_CONVERSION_PATTERN.get(model_type, model_type)
    try:
        from peft.utils.transformers_weight_conversion import _MOE_FUSED_TARGETS, _MOE_TARGET_MODULE_MAPPING

        return set(_MOE_TARGET_MODULE_MAPPING.get(base, {})) if _MOE_FUSED_TARGETS.get(base) else set()
    except ImportError:
        return set(_RENAMED.get(base, ()))


def lora_peft_config(model, layers: dict[str, Any], r: int, alpha: float, dropout: float, **fields: Any
                     ) -> dict[str, Any]:
    """The fields of PEFT's LoraConfig for a LoRA-format export of adapters on `layers` (module
    name -> wrapper layer). `fan_in_fan_out` only tells PEFT how a base weight is laid out
    (GPT-2's Conv1D). `rank_pattern` / `alpha_pattern` in `fields` are keyed by module name."""
    alpha = float(alpha)
    renamed = peft_renamed_leaves(model)
    experts = sorted(m for m, layer in layers.items() if hasattr(layer, "num_experts"))
    as_parameters = sorted(m for m in layers if m.rsplit(".", 1)[-1] in renamed and m not in experts)
    if (as_parameters or experts) and dropout > 0:
        if experts:
            as_parameters = experts

        raise ValueError(f"PEFT takes {as_parameters[0]} as a parameter target, which it refuses with dropout "
                         "(it moves such dense MLP adapters onto the experts otherwise); export an adapter "
                         "trained with method.dropout=0, or merge it (merge_into_backbone)")
    for key in ("rank_pattern", "alpha_pattern"):
        if key in fields:
            fields[key] = {f"{m}.weight" if m in as_parameters else m: v for m, v in fields[key].items()}
    # An expert parameter's (r, alpha) is keyed by its full name, as PEFT matches parameter targets.
    config = {
        "peft_type": "LORA",
        "r": int(r),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(dropout),
        "target_modules": sorted(set(layers) - set(as_parameters) - set(experts)),
        "fan_in_fan_out": any(isinstance(getattr(layer, "base_layer", None), Conv1D) for layer in layers.values()),
        "bias": "none",
        **fields,
    }
    if as_parameters or experts:
        config["target_parameters"] = [f"{m}.weight" for m in as_parameters] + experts
    return config


def peft_keys(model, names) -> dict[str, str]:
    """Where PEFT keeps the adapter of each exported target: the module itself, or for an expert
    parameter its experts module behind one `.base_layer` per exported expert parameter of that
    module PEFT wraps after it (in their order of registration, the last outermost)."""
    from .experts import expert_parameters

    experts = expert_parameters(model)
    keys = {}
    for name in names:
        if name not in experts:
            keys[name] = name
            continue
        path, param = experts[name]
        wrapped = [p for full, (mod, p) in experts.items() if mod == path and full in names]
        keys[name] = path + ".base_layer" * (len(wrapped) - 1 - wrapped.index(param))
    return keys


def lora_peft_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(A, B) per PEFT module key (peft_keys) -> PEFT's tensor names. A is (r x in), B
    (out x r) for linears, Conv1D's too; an expert parameter's are as PEFT stacks them."""
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.detach().clone().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.detach().clone().contiguous()
    return tensors
