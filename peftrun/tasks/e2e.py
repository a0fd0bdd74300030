"""Data-to-text: E2E NLG, scored by corpus BLEU and ROUGE-L against every human reference of a
meaning representation."""

from __future__ import annotations

from peftrun.tasks.base import Example
from peftrun.tasks.hubtask import HubTask
from peftrun.tasks.metrics import corpus_bleu, rouge_l


class E2eNlgTask(HubTask):
    """tuetschek/e2e_nlg: meaning_representation, human_reference (one row per reference)."""

    name = "e2e_nlg"
    primary_metric = "bleu"
    schema = ("meaning_representation", "human_reference")

    def fields(self, record):
        return {"meaning_representation": record["meaning_representation"],
                "human_reference": record["human_reference"]}

    def finish_eval(self, examples: list[Example]) -> list[Example]:
        """One example per input, its references all the rows that share it (train keeps every
        row: each reference is a training target)."""
        grouped: dict[str, Example] = {}
        for ex in examples:
            if ex.prompt in grouped:
                grouped[ex.prompt].references.append(ex.target)
            else:
                grouped[ex.prompt] = Example(ex.prompt, ex.target, [ex.target], ex.id)
        return list(grouped.values())

    def metrics(self, predictions, references):
        return {"bleu": corpus_bleu(predictions, references),
                "rougeL": rouge_l(predictions, references)}
