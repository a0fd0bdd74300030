"""Grade-school math: GSM8K, scored by exact match on the final number."""

from __future__ import annotations

from peftrun.tasks.hubtask import HubTask
from peftrun.tasks.metrics import final_number, mean_score, number_match


class Gsm8kTask(HubTask):
    """openai/gsm8k (config main): question, answer = worked solution ending in '#### N'.
    The model learns the whole solution; only the number after '####' in the reference and the
    last number of the prediction (or the one after its '####') are compared."""

    name = "gsm8k"
    primary_metric = "exact_match"
    schema = ("question", "answer")

    def fields(self, record):
        answer = record["answer"]
        final = final_number(answer)
        return {"question": record["question"], "answer": answer,
                "final_answer": _plain(final)}

    def metrics(self, predictions, references):
        return {"exact_match": mean_score(number_match, predictions, references)}


def _plain(number: float | None) -> str:
    if number is None:
        return ""
    return str(int(number)) if number.is_integer() else str(number)
