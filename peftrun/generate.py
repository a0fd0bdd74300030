"""Batched generation through the LM head, as the training loop evaluates (dev and test
predictions). Batches whose requests each name their adapter (one backbone, several adapters)
are in `peftrun.multitenant`; the `peftrun-generate` command is `peftrun.serve`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .data import encode_prompts


@torch.no_grad()
def generate(
    model,
    tokenizer,
    adapter: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    num_beams: int = 1,
    max_prompt_length: int = 256,
    synced: bool = False,
) -> list[str]:
    """Greedy (or beam) completions of `prompts`, left-padded in batches, stopping at EOS.
    The adapter learns each batch's prompt positions before the forward passes. `synced`: a
    sharded model on several processes; each keeps stepping until all have finished."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = encode_prompts(list(prompts[start : start + batch_size]), tokenizer, max_prompt_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            if adapter is not None:
                adapter.set_prompt_mask(batch["prompt_mask"])
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        if adapter is not None:
            adapter.set_prompt_mask(None)
        model.train(was_training)
    return outputs
