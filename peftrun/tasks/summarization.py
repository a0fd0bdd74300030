"""Dialogue summarization: DialogSum, scored by ROUGE-L (rouge-score)."""

from __future__ import annotations

from peftrun.tasks.hubtask import HubTask
from peftrun.tasks.metrics import rouge_l


class DialogsumTask(HubTask):
    """knkarthick/dialogsum: id, dialogue, summary, topic."""

    name = "dialogsum"
    primary_metric = "rougeL"
    schema = ("dialogue", "summary")

    def fields(self, record):
        return {"id": record.get("id"), "dialogue": record["dialogue"],
                "summary": record["summary"], "topic": record.get("topic", "")}

    def metrics(self, predictions, references):
        return {"rougeL": rouge_l(predictions, references)}
