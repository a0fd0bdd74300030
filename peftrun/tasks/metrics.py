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


# ------------------------------------------------------------------ the papers' task metrics
def squad_f1(pred: str, refs: Sequence[str], normalize: Normalizer = normalize_squad) -> float:
    """SQuAD token F1 (bag of normalized tokens), the best over references."""
    from collections import Counter

    best = 0.0
    pred_tokens = normalize(pred).split()
    for ref in refs:
        ref_tokens = normalize(ref).split()
        if not pred_tokens or not ref_tokens:  # SQuAD v2 convention: both empty is a match
            best = max(best, float(pred_tokens == ref_tokens))
            continue
        common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
        if common:
            precision, recall = common / len(pred_tokens), common / len(ref_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """exact_match and f1 with SQuAD normalization (max over references), and their mean."""
    em = mean_score(exact_match, predictions, references, normalize_squad)
    f1 = mean_score(squad_f1, predictions, references, normalize_squad)
    return {"exact_match": em, "f1": f1, "em_f1": (em + f1) / 2}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The answer of a GSM8K-style text: the number after '####' if any, else the last number."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(text)
        return _as_number(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _as_number(found[-1]) if found else None


def number_match(pred: str, refs: Sequence[str], normalize: Normalizer = normalize_answer) -> float:
    """1.0 if the prediction's final number equals a reference's final number."""
    p = final_number(pred)
    return float(p is not None and any(p == final_number(r) for r in refs))


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemming), the best over references; 0..100."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(max((scorer.score(r, p)["rougeL"].fmeasure for r in refs), default=0.0)
                for p, refs in zip(predictions, references))
    return 100.0 * total / len(predictions)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (13a tokenization); examples may have different numbers of
    references (missing ones are None, which sacrebleu skips)."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
    if not predictions:
        return 0.0
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def normalize_label(text: str) -> str:
    """Lowercase, no punctuation, collapsed whitespace. Articles stay: the option letter "A"
    must not normalize to nothing (SQuAD's normalization would make it match an empty answer)."""
    return " ".join(text.lower().translate(_PUNCT).split())


def choice_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Accuracy of a generated choice: the normalized prediction equals the normalized label
    text, so "Yes." matches "yes" and " B" matches "B"."""
    return mean_score(exact_match, predictions, references, normalize_label)
