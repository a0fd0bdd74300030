"""A disk cache of tokenized examples, so a large task is tokenized once per tokenizer.

The key is a hash of everything the features depend on: the tokenizer (class, name, the full
serialized vocabulary/merges/normalizer when it is a fast tokenizer, else its vocabulary, and
its special tokens), max_length, loss_on_prompt, peftrun's version, and the rendered examples
themselves (prompt, target; a conversation's rendered segments and dropped turns). Hashing the rendered text instead of listing options means a new
template, task option, split seed or dataset revision can never hit a stale entry: they all
change the text. Entries are safetensors files under $PEFTRUN_CACHE (default
~/.cache/peftrun), written to a temporary name and renamed, so concurrent processes are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .data import TokenizeReport, tokenize_examples

FEATURES = ("input_ids", "labels", "prompt_mask")
MIN_EXAMPLES = 1000  # below this tokenizing is quicker than a cache round trip


def cache_dir() -> Path | None:
    """$PEFTRUN_CACHE (or ~/.cache/peftrun); None when it is "off"."""
    value = os.environ.get("PEFTRUN_CACHE", "")
    if value.lower() in ("off", "0", "false", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "peftrun"


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce other ids."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocab, merges, normalizer, post-processor
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps([specials, tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def cache_key(examples, tokenizer, max_length: int, loss_on_prompt: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"peftrun": __version__, "tokenizer": tokenizer_fingerprint(tokenizer),
                         "max_length": max_length, "loss_on_prompt": loss_on_prompt}).encode())
    for ex in examples:
        segments = getattr(ex, "segments", None)
        if segments is None:
            h.update(json.dumps([ex.prompt, ex.target]).encode())
        else:
            h.update(json.dumps([ex.prompt, ex.target, segments, ex.turns_dropped]).encode())
    return h.hexdigest()[:32]


def _save(path: Path, features: Sequence[dict], report: TokenizeReport) -> None:
    lengths = [len(f["input_ids"]) for f in features]
    tensors = {"lengths": torch.tensor(lengths, dtype=torch.int64)}
    for name in FEATURES:
        flat = [x for f in features for x in f[name]]
        tensors[name] = torch.tensor(flat, dtype=torch.int64)
    meta = {"kept": str(report.kept), "truncated": str(report.truncated),
            "dropped": str(report.dropped), "shortened": str(report.shortened), "peftrun": __version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load(path: Path) -> tuple[list[dict], TokenizeReport]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    bounds = [0, *torch.cumsum(tensors["lengths"], 0).tolist()]
    columns = {name: tensors[name].tolist() for name in FEATURES}
    features = [{name: columns[name][lo:hi] for name in FEATURES}
                for lo, hi in zip(bounds[:-1], bounds[1:])]
    report = TokenizeReport(int(meta["kept"]), int(meta["truncated"]), int(meta["dropped"]),
                            int(meta.get("shortened", 0)))
    return features, report


def tokenize_cached(examples, tokenizer, max_length: int, loss_on_prompt: bool = False,
                    min_examples: int = MIN_EXAMPLES):
    """`tokenize_examples`, through the cache for `min_examples` examples or more.
    Returns (features, report, hit) where hit is True, False (written) or None (not cached)."""
    root = cache_dir()
    if root is None or len(examples) < min_examples:
        return (*tokenize_examples(examples, tokenizer, max_length, loss_on_prompt), None)
    path = root / "tokenized" / f"{cache_key(examples, tokenizer, max_length, loss_on_prompt)}.safetensors"
    if path.exists():
        try:
            return (*_load(path), True)
        except Exception:  # a damaged entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    features, report = tokenize_examples(examples, tokenizer, max_length, loss_on_prompt)
    try:
        _save(path, features, report)
    except OSError:
        pass  # a read-only or full disk only costs the cache
    return features, report, False
