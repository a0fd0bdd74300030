"""Answer-matching metrics over generated text. Pure functions; aggregates are in 0..100."""

from __future__ import annotations

import re
import string
from typing import Callable, Sequence

Normalizer = Callable[[str], str]
Matcher = Callable[..., float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Strip and collapse runs of whitespace (generations often carry a leading space)."""
    return " ".join(text.split())


def normalize_squad(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and English articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, refs: Sequence[str], normalize: Normalizer = normalize_answer) -> float:
    """1.0 if the normalized prediction equals any normalized reference."""
    p = normalize(pred)
    return float(any(p == normalize(r) for r in refs))


def contains_match(
    pred: str, refs: Sequence[str], normalize: Normalizer = normalize_answer
) -> float:
    """1.0 if any normalized reference occurs inside the normalized prediction.

    An empty reference matches only an empty prediction (otherwise it would match everything).
    """
    p = normalize(pred)
    for r in refs:
        r = normalize(r)
        if (r and r in p) or (not r and not p):
            return 1.0
    return 0.0


METRICS: dict[str, Matcher] = {"exact_match": exact_match, "contains": contains_match}


def mean_score(
    matcher: Matcher,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    normalize: Normalizer = normalize_answer,
) -> float:
    """Average of `matcher` over pairs, as a percentage; 0.0 for no examples."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
    if not predictions:
        return 0.0
    total = sum(matcher(p, refs, normalize) for p, refs in zip(predictions, references))
    return 100.0 * total / len(predictions)
