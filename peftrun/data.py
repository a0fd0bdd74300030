"""Tokenize (prompt, target) examples and conversations, mask the labels, and pad or pack batches.

Labels are aligned with input_ids (the model shifts them); -100 marks positions without loss.
A conversation (task=chat) comes as rendered text segments, each trained or not: it is tokenized
as one text and every token that starts inside a trained segment (an assistant reply) is
labelled; its prompt_mask covers the tokens before the first trained one.
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
    # conversations the task shortened by whole turns from the left to fit (a subset of `kept`)
    shortened: int = 0

    def __str__(self) -> str:
        text = (f"kept {self.kept} of {self.kept + self.dropped} examples "
                f"({self.truncated} with the prompt cut from the left to fit, "
                f"{self.dropped} dropped because the target alone does not fit)")
        if self.shortened:
            text += f"; {self.shortened} conversations shortened by whole turns from the left"
        return text


def _bos_len(ids: Sequence[int], tokenizer) -> int:
    """1 if the tokenizer put a BOS in front of `ids`, else 0."""
    bos = tokenizer.bos_token_id
    return int(bos is not None and len(ids) > 0 and ids[0] == bos)


def _cut_left(ids: list[int], keep: int, n_bos: int) -> list[int]:
    """Keep the BOS (if any) and the last `keep` of the remaining tokens."""
    return ids[:n_bos] + ids[len(ids) - keep:]


def adds_specials(tokenizer, text: str) -> bool:
    """Whether to let the tokenizer add its special tokens (BOS) to `text`: not when the text
    already starts with the BOS token (a chat template that writes it), which would double it."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def tokenize_conversation(segments: Sequence[tuple[str, bool]], tokenizer) -> tuple[list[int], list[bool]]:
    """Ids of the segments' text, tokenized as one text (the ids generation sees for the same
    text), and per token whether it is trained: a token is when it starts inside a trained
    segment. Tokens the tokenizer adds (BOS) are never trained."""
    text = "".join(t for t, _ in segments)
    specials = adds_specials(tokenizer, text)
    if getattr(tokenizer, "is_fast", False):
        spans, start = [], 0
        for piece, trained in segments:
            if trained:
                spans.append((start, start + len(piece)))
            start += len(piece)
        enc = tokenizer(text, add_special_tokens=specials, return_offsets_mapping=True)
        flags = [lo < hi and any(a <= lo < b for a, b in spans) for lo, hi in enc["offset_mapping"]]
        return list(enc["input_ids"]), flags
    # A slow tokenizer has no offsets: segment by segment (ids may differ at the seams).
    ids, flags = [], []
    if specials:
        ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
        flags = [False] * len(ids)
    for piece, trained in segments:
        part = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
        ids += part
        flags += [trained] * len(part)
    return ids, flags


def _conversation_feature(ex, tokenizer, max_length: int, loss_on_prompt: bool) -> dict | None:
    """The feature of a conversation; None when it does not fit in max_length (the task has
    already left out whole leading turns where that helps: a reply is never cut)."""
    ids, flags = tokenize_conversation(ex.segments, tokenizer)
    if len(ids) > max_length or not any(flags):
        return None
    first = flags.index(True)
    return {
        "input_ids": ids,
        "labels": list(ids) if loss_on_prompt else [i if f else IGNORE_INDEX for i, f in zip(ids, flags)],
        "prompt_mask": [1] * first + [0] * (len(ids) - first),
    }


def tokenize_examples(examples, tokenizer, max_length: int, loss_on_prompt: bool = False):
    """Features (`input_ids`, `labels`, `prompt_mask`, as int lists) and a TokenizeReport.

    The target is tokenized on its own, then EOS, so that the model learns to stop. A too long
    example loses prompt tokens from the left (never the BOS, never the target); if not even one
    prompt token fits next to the target, it is dropped. A conversation (`ex.segments`) is
    labelled on its trained segments (the chat template closes each reply) and dropped when it
    does not fit.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("model.tokenizer", "the tokenizer has no eos_token; pick a tokenizer "
                                             "with one so the model can learn to stop")
    features, report = [], TokenizeReport()
    for ex in examples:
        if getattr(ex, "segments", None) is not None:
            feature = _conversation_feature(ex, tokenizer, max_length, loss_on_prompt)
            if feature is None:
                report.dropped += 1
                continue
            report.kept += 1
            report.shortened += int(getattr(ex, "turns_dropped", 0) > 0)
            features.append(feature)
            continue
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


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices grouped into rows of at most `capacity` tokens (an
    example longer than that gets a row of its own). Longest examples first, ties by index, so
    the layout is a function of the lengths alone."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def collate_packed(features: Sequence[dict], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """The features concatenated into rows of at most `max_length` tokens (`pack_rows`), right-
    padded to the longest row: `input_ids`, `labels`, `prompt_mask`, `position_ids` (from 0 in
    each example, and again on the padding) and `segment_ids` (each token's example, numbered
    over the batch in row-major order from 0; -1 on padding). No attention_mask: given
    `position_ids` alone, transformers' masking keeps attention inside each example (see
    peftrun/packing.py). Each example's first token is unlabelled, so no example predicts across
    a boundary; the padded batch (`collate_train`) never labels a row's first token either, so
    both count the same labels."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set the tokenizer's pad token first")
    rows = pack_rows([len(f["input_ids"]) for f in features], max_length)
    width = max((sum(len(features[i]["input_ids"]) for i in row) for row in rows), default=0)
    keys = ("input_ids", "labels", "prompt_mask", "position_ids", "segment_ids")
    out: dict[str, list] = {k: [] for k in keys}
    segment = 0
    for row in rows:
        packed = {k: [] for k in keys}
        for i in row:
            f, n = features[i], len(features[i]["input_ids"])
            packed["input_ids"] += f["input_ids"]
            packed["labels"] += [IGNORE_INDEX] + list(f["labels"][1:])
            packed["prompt_mask"] += f["prompt_mask"]
            packed["position_ids"] += range(n)
            packed["segment_ids"] += [segment] * n
            segment += 1
        pad = width - len(packed["input_ids"])
        for k, fill in (("input_ids", [pad_token_id] * pad), ("labels", [IGNORE_INDEX] * pad),
                        ("prompt_mask", [0] * pad), ("position_ids", range(pad)), ("segment_ids", [-1] * pad)):
            out[k].append(packed[k] + list(fill))
    return {k: torch.tensor(v, dtype=torch.long).reshape(len(rows), width) for k, v in out.items()}


def collate(features: Sequence[dict], pad_token_id: int, packing_length: int | None = None) -> dict[str, torch.Tensor]:
    """`collate_packed` into rows of `packing_length` tokens, or `collate_train` when None."""
    if packing_length is None:
        return collate_train(features, pad_token_id)
    return collate_packed(features, pad_token_id, packing_length)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the batch that are not padding, packed or not."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum())
    return int(batch["attention_mask"].sum())


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
        ids = list(tokenizer(text, add_special_tokens=adds_specials(tokenizer, text))["input_ids"])
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
