"""Instruction tuning: Alpaca (yahma/alpaca-cleaned), scored by ROUGE-L of the response."""

from __future__ import annotations

from peftrun.tasks.hubtask import HubTask
from peftrun.tasks.metrics import rouge_l


class AlpacaTask(HubTask):
    """yahma/alpaca-cleaned: instruction, input (may be empty), output. Train split only, so
    a dev set is held out (task.dev_split: null). `{input_block}` is the Alpaca template's
    "### Input:" section, empty when the record has no input."""

    name = "alpaca"
    primary_metric = "rougeL"
    schema = ("instruction", "input", "output")

    def fields(self, record):
        extra = (record.get("input") or "").strip()
        return {"instruction": record["instruction"], "input": extra, "output": record["output"],
                "input_block": f"\n\n### Input:\n{extra}" if extra else ""}

    def metrics(self, predictions, references):
        return {"rougeL": rouge_l(predictions, references)}
