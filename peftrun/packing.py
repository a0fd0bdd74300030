"""Which backbones can train on packed rows (trainer.packing, data.collate_packed), and the
attention mask the few that need one get.

A packed row holds several examples; attention must stay inside each. Given `position_ids` that
restart at 0 per example, no attention_mask and no cache, transformers' masking_utils finds the
examples (find_packed_sequence_indices) and builds a block-diagonal causal mask for eager, sdpa
and flex attention, and varlen flash-attention uses the positions itself. Checked on every family
of tests/test_architectures.py (tests/test_packing.py compares a packed row's logits with its
examples run alone), most models get it; the exceptions are listed here:

* EXPLICIT_MASK: the model builds its masks without `position_ids` (OPT, GPT-OSS): we build the
  mask transformers would have built from them and pass it (4-D, or one per layer kind).
* REFUSED: no mask we can pass reaches the attention (Bloom builds its ALiBi bias and mask from a
  2-D attention_mask).

A model type that is none of these and was not checked (TESTED) is refused too: a wrong mask
trains silently on text that crosses examples.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

# model_type of every family tests/test_packing.py checks, the explicit-mask ones included.
TESTED = frozenset({
    "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "gpt_neox", "falcon",
    "opt", "gpt2", "gpt_bigcode", "stablelm", "olmo2", "granite", "mixtral", "qwen2_moe", "qwen3_moe",
    "starcoder2", "cohere", "gptj", "gpt_oss", "deepseek_v3", "smollm3",
})
EXPLICIT_MASK = frozenset({"opt", "gpt_oss"})
REFUSED = {"bloom": "Bloom builds its ALiBi bias and attention mask from a 2-D padding mask, so examples "
                    "packed in one row would attend to each other"}
# Attention kernels that take the explicit mask we build (flash kernels take no 4-D mask).
MASKED_KERNELS = ("eager", "sdpa")


def packing_refusal(model_type: str, attn_implementation: str | None) -> str | None:
    """Why trainer.packing cannot train this backbone, or None when it can."""
    if model_type in REFUSED:
        return REFUSED[model_type]
    if model_type not in TESTED:
        return f"packing is not checked on model type {model_type!r} (a wrong mask would let examples attend to each other)"
    if model_type in EXPLICIT_MASK and (attn_implementation or "sdpa") not in MASKED_KERNELS:
        return f"{model_type} gets its packed mask from us, which {attn_implementation} attention does not take"
    return None


def check_packing(model: torch.nn.Module, attn_implementation: str | None) -> None:
    """ConfigError naming trainer.packing unless the backbone (a meta-device model will do) packs."""
    why = packing_refusal(model.config.model_type, attn_implementation)
    if why is not None:
        raise ConfigError("trainer.packing", f"{why}; set trainer.packing=false "
                                             f"(trainer.group_by_length=true also cuts most padding)")


def packed_attention_mask(model: torch.nn.Module, position_ids: torch.Tensor, dtype: torch.dtype):
    """The attention_mask to pass with a packed batch's `position_ids`: None for most backbones
    (transformers builds it from the positions), else the block-diagonal mask transformers would
    have built (a dict by layer kind where the model has sliding-window layers)."""
    config = getattr(model, "config", None)
    if config is None or config.model_type not in EXPLICIT_MASK:
        return None
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    # Only the shape, dtype and device of the embeddings matter to the mask.
    shape = (*position_ids.shape, 1)
    embeds = torch.empty(shape, dtype=dtype, device=position_ids.device)
    kwargs = dict(config=config, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=position_ids)
    full = create_causal_mask(**kwargs)
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return full
    return {"full_attention": full, "sliding_attention": create_sliding_window_causal_mask(**kwargs)}
