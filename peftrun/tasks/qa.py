"""Extractive question answering: SQuAD v1.1 (EM and F1 with SQuAD normalization)."""

from __future__ import annotations

from peftrun.tasks.hubtask import HubTask
from peftrun.tasks.metrics import squad_scores


class SquadTask(HubTask):
    """rajpurkar/squad: id, title, context, question, answers {text: [...], answer_start: [...]}.
    The target is the first answer; a prediction is scored against all of them."""

    name = "squad"
    primary_metric = "exact_match"
    schema = ("context", "question", "answers.text")

    def fields(self, record):
        answers = [a for a in record["answers"]["text"] if a is not None]
        if not answers:
            return None
        return {"id": record.get("id"), "title": record.get("title", ""),
                "context": record["context"], "question": record["question"],
                "answer": answers[0], "answers": answers}

    def references(self, fields, target):
        return list(fields["answers"])

    def metrics(self, predictions, references):
        return squad_scores(predictions, references)
