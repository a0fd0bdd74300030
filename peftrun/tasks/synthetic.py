"""Offline downstream tasks over the invented world of `synthetic_world.py`, in forms the
pretraining corpus never uses (paragraphs with "Question:/Answer:", word problems, reviews with
label words), so a backbone pretrained on that corpus has the skills but not the formats:

* `synth_qa` (SQuAD-like span extraction): "Context: Mira was born in Kora and lives in Dedu.
  Mira is married to Tor.\\nQuestion: Where does Mira live?\\nAnswer:" -> " Dedu"; exact match / F1.
* `synth_math` (GSM8K-like): "Question: Mira has 7 stamps. Mira buys 5 more. Mira loses 3. How
  many stamps does Mira have now?\\nAnswer:" -> " 7 + 5 = 12. 12 - 3 = 9. #### 9";
  accuracy of the final number.
* `synth_sentiment` (classification as generation): "Review: The soup was tasty but the tea was
  cold.\\nSentiment:" -> " mixed" (positive | negative | mixed, balanced); accuracy.

Splits are drawn from one seeded stream, test first, then dev, then train, and no prompt occurs
twice: dev and test are disjoint from train, and changing num_train never changes them.
"""

from __future__ import annotations

import random

from peftrun.tasks.base import BuiltOnce, Example, check_counts, check_limits, distinct, generated_splits
from peftrun.tasks.metrics import choice_accuracy, mean_score, number_match, squad_scores
from peftrun.tasks.synthetic_world import (ANIMALS, COLORS, FOODS, JOBS, NEGATIVE, PEOPLE, PLACES, POSITIVE,
                                           arithmetic_chain, render_chain, story)


class SyntheticTask(BuiltOnce):
    """Shared part: seeded generation of distinct examples and their splits. A subclass draws
    one example from an rng (`draw`) and scores predictions (`metrics`)."""

    name = "synthetic"
    primary_metric = "accuracy"

    def __init__(self, cfg):
        self.cfg = cfg
        check_limits(cfg)
        check_counts(cfg)

    def validate(self) -> None:
        pass  # everything was checked in __init__; nothing to read

    def draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def metrics(self, predictions, references) -> dict[str, float]:
        raise NotImplementedError

    def _build(self) -> dict[str, list[Example]]:
        cfg = self.cfg
        rng = random.Random(f"{self.name}-{cfg.seed}")
        # The spaces are huge (names x places x numbers), so drawing distinct prompts ends fast.
        total = cfg.num_test + cfg.num_dev + cfg.num_train
        return generated_splits(distinct(lambda: self.draw(rng), total, key=lambda ex: ex.prompt), cfg, self.name)

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        return self.metrics(predictions, [ex.references for ex in examples])


# ------------------------------------------------------------------------------ span extraction
# One person's facts: (clause, question, answer kind). Three place slots and two person slots, so
# the answer's kind never gives it away: the question's cue picks the span.
_QA_FACTS = {
    "born": ("was born in {place}", "Where was {p} born?"),
    "home": ("lives in {place}", "Where does {p} live?"),
    "visit": ("often visits {place}", "Which town does {p} often visit?"),
    "friend": ("is friends with {person}", "Who is {p}'s friend?"),
    "spouse": ("is married to {person}", "Who is {p} married to?"),
    "job": ("works as a {job}", "What is {p}'s job?"),
    "pet": ("has a {color} {animal}", None),  # two questions, below
}


class SynthQaTask(SyntheticTask):
    """A paragraph about one person (three to five facts, several places and people among them);
    a question whose answer is a span of it."""

    name = "synth_qa"
    primary_metric = "exact_match"

    def draw(self, rng: random.Random) -> Example:
        p = rng.choice(PEOPLE)
        places = rng.sample(PLACES, 3)
        people = rng.sample([q for q in PEOPLE if q != p], 2)
        values = {"place": None, "person": None, "job": rng.choice(JOBS), "color": rng.choice(COLORS),
                  "animal": rng.choice(ANIMALS)}
        kinds = rng.sample(list(_QA_FACTS), rng.randint(3, 5))
        clauses, questions = [], []
        for kind in kinds:
            clause, question = _QA_FACTS[kind]
            fill = dict(values, place=places.pop() if "{place}" in clause else None,
                        person=people.pop() if "{person}" in clause else None)
            clauses.append(clause.format(**fill))
            if kind == "pet":
                questions.append((f"Which animal does {p} have?", fill["animal"]))
                questions.append((f"What color is {p}'s {fill['animal']}?", fill["color"]))
            else:
                answer = fill["place"] or fill["person"] or fill["job"]
                questions.append((question.format(p=p), answer))
        # Two sentences, each opening with the name: "P a, b and c."
        cut = rng.randint(1, len(clauses) - 1)
        sentences = [f"{p} " + (", ".join(part[:-1]) + " and " if len(part) > 1 else "") + part[-1] + "."
                     for part in (clauses[:cut], clauses[cut:])]
        question, answer = rng.choice(questions)
        prompt = f"Context: {' '.join(sentences)}\nQuestion: {question}\nAnswer:"
        return Example(prompt=prompt, target=f" {answer}", references=[answer])

    def metrics(self, predictions, references):
        return squad_scores(predictions, references)


# ----------------------------------------------------------------------------- word problems
class SynthMathTask(SyntheticTask):
    """A word problem of two +/- steps; the answer works the steps, then '#### N'."""

    name = "synth_math"
    primary_metric = "accuracy"

    def draw(self, rng: random.Random) -> Example:
        chain, final = arithmetic_chain(rng, rng.randint(2, 30), 2)
        text, p, item = story(rng, chain)
        prompt = f"Question: {text} How many {item} does {p} have now?\nAnswer:"
        target = f" {render_chain(chain)} #### {final}"
        return Example(prompt=prompt, target=target, references=[target])

    def metrics(self, predictions, references):
        return {"accuracy": mean_score(number_match, predictions, references)}


# ---------------------------------------------------------------------------- classification
LABELS = ("positive", "negative", "mixed")


class SynthSentimentTask(SyntheticTask):
    """A short review of two or three dishes; the label word says whether every adjective is
    positive, every one negative, or both kinds occur. Labels are balanced."""

    name = "synth_sentiment"
    primary_metric = "accuracy"

    def draw(self, rng: random.Random) -> Example:
        label = rng.choice(LABELS)
        n = rng.randint(2, 3)
        if label == "positive":
            polarity = [True] * n
        elif label == "negative":
            polarity = [False] * n
        else:
            polarity = [rng.random() < 0.5 for _ in range(n)]
            if all(polarity) or not any(polarity):
                polarity[rng.randrange(n)] = not polarity[0]
        foods = rng.sample(FOODS, n)
        clauses = [f"the {f} was {rng.choice(POSITIVE if good else NEGATIVE)}" for f, good in zip(foods, polarity)]
        joint = " but " if label == "mixed" and rng.random() < 0.5 else " and "
        text = ", ".join(clauses[:-1]) + joint + clauses[-1]
        prompt = f"Review: {text[0].upper() + text[1:]}.\nSentiment:"
        return Example(prompt=prompt, target=f" {label}", references=[label])

    def metrics(self, predictions, references):
        return {"accuracy": choice_accuracy(predictions, references)}


SYNTHETIC_TASKS = (SynthQaTask, SynthMathTask, SynthSentimentTask)
