"""Tokenize (prompt, target) examples, mask the labels, and pad batches.

Labels are aligned with input_ids (the model shifts them); -100 marks positions without loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

import torch

from peftrun.errors import ConfigError

IGNORE_INDEX = -100
T = TypeVar("T")


@dataclass
class TokenizeReport:
    kept: int = 0
    truncated: int = 0  # kept, with the prompt cut from the left (a subset of `kept`)
    dropped: int = 0  # the target alone did not fit in max_length

    def __str__(self) -> str:
        return (f"kept {self.kept} of {self.kept + self.dropped} examples "
                f"({self.truncated} with the prompt cut from the left to fit, "
                f"{self.dropped} dropped because the target alone does not fit)")


def _bos_len(ids: Sequence[int], tokenizer) -> int:
    """1 if the tokenizer put a BOS in front of `ids`, else 0."""
    bos = tokenizer.bos_token_id
    return int(bos is not None and len(ids) > 0 and ids[0] == bos)


def _cut_left(ids: list[int], keep: int, n_bos: int) -> list[int]:
    """Keep the BOS (if any) and the last `keep` of the remaining tokens."""
    return ids[:n_bos] + ids[len(ids) - keep:]


def tokenize_examples(examples, tokenizer, max_length: int, loss_on_prompt: bool = False):
    """Features (`input_ids`, `labels`, `prompt_mask`, as int lists) and a TokenizeReport.

    The target is tokenized on its own, then EOS, so that the model learns to stop. A too long
    example loses prompt tokens from the left (never the BOS, never the target); if not even one
    prompt token fits next to the target, it is dropped.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("model.tokenizer", "the tokenizer has no eos_token; pick a tokenizer "
                                             "with one so the model can learn to stop")
    features, report = [], TokenizeReport()
    for ex in examples:
        prompt = list(tokenizer(ex.prompt)["input_ids"])
        target = list(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) + [eos]
        if len(prompt) + len(target) > max_length:
            n_bos = _bos_len(prompt, tokenizer)
            room = max_length - len(target) - n_bos  # for prompt tokens besides the BOS
            if room < 1:
                report.dropped += 1
                continue
            prompt = _cut_left(prompt, room, n_bos)
            report.truncated += 1
        report.kept += 1
        features.append({
            "input_ids": prompt + target,
            "labels": (prompt if loss_on_prompt else [IGNORE_INDEX] * len(prompt)) + target,
            "prompt_mask": [1] * len(prompt) + [0] * len(target),
        })
    return features, report


def collate_train(features: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of features into tensors; padding gets no attention and no loss."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set the tokenizer's pad token first")
    width = max((len(f["input_ids"]) for f in features), default=0)
    out = {k: [] for k in ("input_ids", "attention_mask", "labels", "prompt_mask")}
    for f in features:
        n, pad = len(f["input_ids"]), width - len(f["input_ids"])
        out["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        out["attention_mask"].append([1] * n + [0] * pad)
        out["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        out["prompt_mask"].append(list(f["prompt_mask"]) + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long).reshape(len(features), width)
            for k, v in out.items()}


def encode_prompts(prompts: Sequence[str], tokenizer, max_length: int,
                   pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation, so every row's next token comes right after its prompt.

    Padded by hand: the tokenizer's padding_side is shared state we should not depend on.
    `pad_token_id` defaults to the tokenizer's pad token, else its EOS (as for GPT-2).
    """
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_token_id")
    rows = []
    for text in prompts:
        ids = list(tokenizer(text)["input_ids"])
        if len(ids) > max_length:
            n_bos = _bos_len(ids, tokenizer)
            if max_length - n_bos < 1:
                raise ValueError(f"max_length={max_length} leaves no room for a prompt token")
            ids = _cut_left(ids, max_length - n_bos, n_bos)
        rows.append(ids)
    width = max((len(r) for r in rows), default=0)
    input_ids = [[pad_token_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    shape = (len(rows), width)
    input_ids_t = torch.tensor(input_ids, dtype=torch.long).reshape(shape)
    mask_t = torch.tensor(mask, dtype=torch.long).reshape(shape)
    return {"input_ids": input_ids_t, "attention_mask": mask_t, "prompt_mask": mask_t.clone()}


def batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """Consecutive chunks of `size` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield list(items[i:i + size])
