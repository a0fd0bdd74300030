"""Classification and reading comprehension as generation: SST-2, RTE, QNLI (GLUE), BoolQ,
ReCoRD. The target is a label word; accuracy compares normalized text ("Yes." == "yes").
ReCoRD is scored like SQuAD over its answer entities: the mean of EM and F1."""

from __future__ import annotations

from peftrun.tasks.choice import ChoiceTask, _label
from peftrun.tasks.hubtask import HubTask
from peftrun.tasks.metrics import squad_scores


class LabelWordTask(ChoiceTask):
    """A label id mapped to a word; unlabelled records (-1, as in GLUE's test splits) skipped."""

    words: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()

    @property
    def schema(self):
        return (*self.inputs, "label")

    def fields(self, record):
        label = _label(record["label"])
        if label is None:
            return None
        return {"id": record.get("idx"), **{k: record[k] for k in self.inputs},
                "label": self.words[label]}


class Sst2Task(LabelWordTask):
    """nyu-mll/glue sst2: sentence, label (0 negative, 1 positive), idx."""

    name = "sst2"
    inputs = ("sentence",)
    words = ("negative", "positive")


class RteTask(LabelWordTask):
    """nyu-mll/glue rte: sentence1, sentence2, label (0 entailment, 1 not_entailment), idx."""

    name = "rte"
    inputs = ("sentence1", "sentence2")
    words = ("yes", "no")


class QnliTask(LabelWordTask):
    """nyu-mll/glue qnli: question, sentence, label (0 entailment, 1 not_entailment), idx."""

    name = "qnli"
    inputs = ("question", "sentence")
    words = ("yes", "no")


class BoolqTask(ChoiceTask):
    """google/boolq: question, answer (bool), passage. SuperGLUE's copy (label 0/1, idx) works too."""

    name = "boolq"
    schema = ("question", "passage", "answer")

    def fields(self, record):
        if "answer" in record:
            answer = record["answer"]
        else:
            label = _label(record["label"])
            if label is None:
                return None
            answer = bool(label)
        return {"id": record.get("idx"), "question": record["question"],
                "passage": record["passage"], "label": "yes" if answer else "no"}


class RecordTask(HubTask):
    """super_glue record: passage (with '@highlight' lines), query (with '@placeholder'),
    entities, answers. The target is the first answer; all of them are references."""

    name = "record"
    primary_metric = "em_f1"
    schema = ("passage", "query", "entities", "answers")

    def fields(self, record):
        answers = list(record["answers"])
        if not answers:
            return None
        idx = record.get("idx")
        ident = f"{idx['passage']}-{idx['query']}" if isinstance(idx, dict) else idx
        return {"id": ident, "passage": record["passage"].replace("@highlight\n", "- "),
                "query": record["query"], "entities": ", ".join(dict.fromkeys(record["entities"])),
                "answer": answers[0], "answers": answers}

    def references(self, fields, target):
        return list(fields["answers"])

    def metrics(self, predictions, references):
        return squad_scores(predictions, references)
