"""The training objective: next-token cross-entropy over the labelled (target) positions."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from .packing import packed_attention_mask


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions of full (batch, length, vocab)
    logits (normalized by the caller)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the (unwrapped) model's forward takes `logits_to_keep` (transformers' causal LMs)."""
    return _forward_takes_logits_to_keep(type(model))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    # Per class, once: callers may ask on every step.
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    """The forward's arguments for a padded batch (attention_mask) or a packed one (position_ids,
    and the mask the few backbones that need one get, peftrun/packing.py). No KV cache: a loss
    forward does not need one, it saves memory, and transformers detects packing only without."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" not in batch:
        inputs["attention_mask"] = batch["attention_mask"]
        return inputs
    inputs["position_ids"] = batch["position_ids"]
    base = getattr(model, "module", model)  # DDP wraps the model
    mask = packed_attention_mask(base, batch["position_ids"], getattr(base, "dtype", torch.float32))
    if mask is not None:
        inputs["attention_mask"] = mask
    return inputs


def labelled_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], kept_logits: bool = True) -> torch.Tensor:
    """`token_loss_sum` of the model on a batch (padded or packed), with the LM head applied only
    at positions that predict a label when `kept_logits` (see `keeps_logits`): a prompt-heavy
    batch has most of its positions unlabelled, and full logits are batch x length x vocab
    floats. The gradient is the same; the sum may differ from the full-logits one by float
    rounding only."""
    inputs = model_inputs(model, batch)
    if not kept_logits:
        return token_loss_sum(model(**inputs).logits, batch["labels"])
    labelled = batch["labels"][:, 1:] != -100
    # Position t predicts token t + 1; a boolean mask gives the kept rows flattened, in order.
    keep = F.pad(labelled, (0, 1), value=False)
    logits = model(**inputs, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float(), batch["labels"][:, 1:][labelled], reduction="sum")
