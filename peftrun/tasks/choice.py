"""Multiple choice as generation: HellaSwag, Social IQa, COPA. The prompt lists the options
as A., B., ...; the target is the correct letter (or, with `{answer_text}` in the target
template, the option's text). Accuracy: the normalized generation equals the target."""

from __future__ import annotations

import string

from peftrun.tasks.hubtask import HubTask
from peftrun.tasks.metrics import choice_accuracy

LETTERS = string.ascii_uppercase


def option_fields(options: list[str], answer: int) -> dict:
    """{options: "A. ...\\nB. ...", answer: "B", answer_text: the option} for the templates."""
    if not 0 <= answer < len(options):
        raise ValueError(f"label {answer} is not one of the {len(options)} options")
    return {"options": "\n".join(f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(options)),
            "answer": LETTERS[answer], "answer_text": options[answer].strip()}


def _label(value) -> int | None:
    """An int label, or None for the unlabelled records of test splits ("" or -1)."""
    if value is None or value == "" or int(value) < 0:
        return None
    return int(value)


class ChoiceTask(HubTask):
    primary_metric = "accuracy"

    def metrics(self, predictions, references):
        return {"accuracy": choice_accuracy(predictions, references)}


class HellaswagTask(ChoiceTask):
    """Rowan/hellaswag: ind, activity_label, ctx (= ctx_a + ctx_b), endings (4), label ("0".."3")."""

    name = "hellaswag"
    schema = ("ctx", "endings", "label")

    def fields(self, record):
        label = _label(record["label"])
        if label is None:
            return None
        return {"id": record.get("ind"), "activity": record.get("activity_label", ""),
                "context": record["ctx"], **option_fields(list(record["endings"]), label)}


class SiqaTask(ChoiceTask):
    """allenai/social_i_qa: context, question, answerA, answerB, answerC, label ("1".."3")."""

    name = "siqa"
    schema = ("context", "question", "answerA", "answerB", "answerC", "label")

    def fields(self, record):
        label = _label(record["label"])
        if label is None:
            return None
        options = [record["answerA"], record["answerB"], record["answerC"]]
        return {"context": record["context"], "question": record["question"],
                **option_fields(options, label - 1)}


class CopaTask(ChoiceTask):
    """super_glue copa: premise, choice1, choice2, question ("cause" | "effect"), idx, label."""

    name = "copa"
    schema = ("premise", "choice1", "choice2", "question", "label")
    ASK = {"cause": "What was the cause?", "effect": "What happened as a result?"}

    def fields(self, record):
        label = _label(record["label"])
        if label is None:
            return None
        return {"id": record.get("idx"), "premise": record["premise"],
                "question": self.ASK[record["question"]],
                **option_fields([record["choice1"], record["choice2"]], label)}
