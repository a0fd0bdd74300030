"""The generated pretraining corpus of the small backbone behind `model=tiny_pretrained`
(`scripts/pretrain_tiny.py`), over the invented world of the synthetic downstream tasks
(`peftrun/tasks/synthetic_world.py`: its names, word lists and arithmetic stories).

The corpus and the tasks speak of the same places, people, jobs and adjectives; what differs is
the *form*: the corpus uses the templates below (facts as "The job of Mira is baker.", questions
as "Q: ... A: ...", equations and one-step stories, "..., so Mira was happy."), the tasks use
others (paragraphs and "Question:/Answer:", word problems, "Review:/Sentiment:" with label words
that mean something else in the corpus). `CORPUS_NEVER` matches those task-only forms; the tests
check that no corpus document contains one. The words themselves do occur, in everyday sentences
(`doc_everyday`): without them a word-piece tokenizer trained on the corpus spells "positive" or
"####" in single letters the backbone never learnt to write.

Everything is a function of a seed through `random.Random`: the same seed gives the same text
on every machine and Python version (3.2+ string seeding is stable).
"""

from __future__ import annotations

import random
import re
from typing import Callable, Iterator

from peftrun.tasks.synthetic_world import (ANIMALS, COLORS, FOODS, ITEMS, JOBS, NEGATIVE, PEOPLE, PLACES,
                                           POSITIVE, WORDS, arithmetic_chain, render_chain, story)

# Relations of the fact-lookup skill: subject kind, value kind (a pool to draw from).
RELATIONS: dict[str, tuple[list[str], list[str]]] = {
    "capital": (PLACES, PLACES),
    "ruler": (PLACES, PEOPLE),
    "color": (PLACES, COLORS),
    "home": (PEOPLE, PLACES),
    "job": (PEOPLE, JOBS),
    "pet": (PEOPLE, ANIMALS),
    "food": (PEOPLE, FOODS),
}

# The downstream tasks' own forms (templates, the answer marker before a number, the fact
# phrasings of synth_qa): never in the corpus. Their *words* are (see `doc_everyday`), as a
# pretrained model knows the words of a task it has never seen.
CORPUS_NEVER = re.compile(r"Context:|Question:|Answer:|Review:|Sentiment:|#### \d|lives in|works as|How many")

SKILLS = ("lookup", "copy", "arithmetic", "instruction", "sentiment", "everyday")


# ------------------------------------------------------------------------ pretraining corpus
def _facts(rng: random.Random, subjects: int) -> list[tuple[str, str, str]]:
    """Facts (relation, subject, value) about `subjects` subjects, two to four relations each,
    shuffled together. With one subject a question is answered by its relation alone; with two,
    the subject must be matched as well."""
    people = [r for r in RELATIONS if RELATIONS[r][0] is PEOPLE]
    places = [r for r in RELATIONS if RELATIONS[r][0] is PLACES]
    facts = []
    for subject in rng.sample(PEOPLE + PLACES, subjects):
        relations = people if subject in PEOPLE else places
        for rel in rng.sample(relations, rng.randint(2, len(relations))):
            facts.append((rel, subject, rng.choice([v for v in RELATIONS[rel][1] if v != subject])))
    rng.shuffle(facts)
    return facts


def doc_lookup(rng: random.Random) -> str:
    """Facts stated, then asked about: "The job of Mira is baker. The pet of Mira is owl. ...
    Q: What is the job of Mira? A: baker"."""
    facts = _facts(rng, 1 if rng.random() < 0.6 else 2)
    text = " ".join(f"The {r} of {s} is {v}." for r, s, v in facts)
    asked = rng.sample(facts, rng.randint(1, min(3, len(facts))))
    return text + "\n" + "".join(f"Q: What is the {r} of {s}? A: {v}\n" for r, s, v in asked)


def _word_list(rng: random.Random, lo: int, hi: int) -> str:
    """lo..hi distinct words and names: no word twice, so every word says where a copy goes on."""
    return " ".join(rng.sample(_COPY_POOL, rng.randint(lo, hi)))


_COPY_POOL = WORDS + PLACES + PEOPLE


def doc_copy(rng: random.Random) -> str:
    """Copy a span verbatim: "Copy: red fox tea => red fox tea" (or names, or a quoted span)."""
    lines = []
    for _ in range(rng.randint(1, 2)):
        span = _word_list(rng, 4, 16)
        kind = rng.random()
        if kind < 0.5:
            lines.append(f"Copy: {span} => {span}")
        elif kind < 0.8:
            lines.append(f"Repeat after me. {span}. {span}.")
        else:
            name = rng.choice(PLACES + PEOPLE)
            lines.append(f'{name} said "{span}". Again: "{span}".')
    return "\n".join(lines) + "\n"


def worked_story(rng: random.Random, chain: list[tuple[int, str, int, int]]) -> tuple[str, str]:
    """A story and how it ends, worked when it has several steps: ("Mira has 7 eggs. Mira sells 3.
    Mira finds 5 more.", " 7 - 3 = 4. 4 + 5 = 9. Now Mira has 9 eggs.")."""
    text, p, item = story(rng, chain)
    worked = f" {render_chain(chain)}" if len(chain) > 1 else ""
    return text, f"{worked} Now {p} has {chain[-1][3]} {item}."


def doc_arithmetic(rng: random.Random) -> str:
    """Bare equations, chains and stories: "14 - 5 = 9", "Compute 7 + 5 - 3. 7 + 5 = 12. 12 - 3 =
    9. So the result is 9.", "Mira has 7 eggs. Mira sells 3. Now Mira has 4 eggs.", and stories of
    several steps worked out before the end: "... Mira finds 5 more. 7 - 3 = 4. 4 + 5 = 9. Now
    Mira has 9 eggs."."""
    lines = []
    for _ in range(rng.randint(2, 4)):
        chain, final = arithmetic_chain(rng, rng.randint(1, 40), rng.randint(1, 3))
        if rng.random() < 0.5:
            lines.append("".join(worked_story(rng, chain)))
        elif len(chain) == 1:
            a, op, b, r = chain[0]
            lines.append(f"{a} {op} {b} = {r}")
        else:
            expr = str(chain[0][0]) + "".join(f" {op} {b}" for _, op, b, _ in chain)
            lines.append(f"Compute {expr}. {render_chain(chain)} So the result is {final}.")
    return "\n".join(lines) + "\n"


_INSTRUCTIONS: list[tuple[str, Callable[[list[str]], str]]] = [
    ("Write the words in capitals.", lambda w: " ".join(w).upper()),
    ("Give the first word.", lambda w: w[0]),
    ("Give the last word.", lambda w: w[-1]),
    ("Count the words.", lambda w: str(len(w))),
    ("Reverse the order of the words.", lambda w: " ".join(reversed(w))),
    ("Sort the words.", lambda w: " ".join(sorted(w))),
]


def doc_instruction(rng: random.Random) -> str:
    """"Instruction: Give the last word.\\nInput: red fox tea\\nOutput: tea"."""
    text, fn = rng.choice(_INSTRUCTIONS)
    words = _word_list(rng, 2, 5).split()
    return f"Instruction: {text}\nInput: {' '.join(words)}\nOutput: {fn(words)}\n"


def doc_sentiment(rng: random.Random) -> str:
    """Adjectives and how people felt: "The soup was tasty, so Mira was happy." or "Tor ate the
    stale bread and felt sad."."""
    lines = []
    for _ in range(rng.randint(2, 4)):
        good = rng.random() < 0.5
        adj = rng.choice(POSITIVE if good else NEGATIVE)
        food, person = rng.choice(FOODS), rng.choice(PEOPLE)
        mood = "happy" if good else "sad"
        if rng.random() < 0.5:
            lines.append(f"The {food} was {adj}, so {person} was {mood}.")
        else:
            lines.append(f"{person} ate the {adj} {food} and felt {mood}.")
    return " ".join(lines) + "\n"


# Everyday sentences that use the downstream tasks' words in other senses and combinations
# ("positive" of a test, "mixed" as a verb, "####" as a heading): the words a real pretrained
# model would know. Slots: p, q people; place; food, food2; items; animal, animal2; color; job.
_EVERYDAY = [
    "{p} was born on a cold day.", "{p} got married to {q} in the spring.", "{p} and {q} are good friends.",
    "{p} is a friend of the {job}.", "{p} often eats {food} with {q}.", "{p} visits {q} in the summer.",
    "Where is the {animal}? It is near the {food}.", "Who has the {color} {animal}? It is {p}.",
    "Which {animal} does {p} like? The {color} one.", "{p} buys {food} and sells {items}.",
    "{p} finds some {items} in {place}.", "{p} wins the race and gets a {food}.",
    "{p} loses the game and gives away the {food}.", "Many people live in {place}, a big town.",
    "{p} has more {items} than {q}.", "{p} is in {place} now.", "How old is the {animal} of {p}?",
    "{p} wrote a long review of the town.", "{p} asked a question and {q} gave the answer.",
    "The answer to the question was in the book.", "The test of {p} came back negative.",
    "The test of {p} came back positive.", "The count was positive, not negative.",
    "{p} mixed the {food} and the {food2}.", "The {animal} has mixed colors.",
    "In this context, the {job} means the {job2}.", "The context of the story is {place}.",
    "The sentiment in {place} is calm.", "{p} works hard every day.", "{p}'s {animal} sleeps with the {animal2}.",
    "{p} went away to {place}.", "{p} likes {food}, but {q} does not.", "{p} and {q} have a {animal}.",
    "The {job} lives with a {animal}.", "Answer the door, {p}.", "Review the list, said {q}.",
    "Question the {job}, said {p}.", "Context helps the {job}.", "Sentiment runs high in {place}.",
    "{p} came to visit the {job}.", "{p} is as tall as {q}.", "The {animal} is a small animal.",
    "There are many {items} in {place}.",
]


def doc_everyday(rng: random.Random) -> str:
    """A short note of everyday sentences, sometimes under a "#### Place" heading."""
    people, foods = rng.sample(PEOPLE, 2), rng.sample(FOODS, 2)
    animals, jobs = rng.sample(ANIMALS, 2), rng.sample(JOBS, 2)
    slots = dict(p=people[0], q=people[1], place=rng.choice(PLACES), food=foods[0], food2=foods[1],
                 items=rng.choice(ITEMS), animal=animals[0], animal2=animals[1], color=rng.choice(COLORS),
                 job=jobs[0], job2=jobs[1])
    text = " ".join(t.format(**slots) for t in rng.sample(_EVERYDAY, rng.randint(2, 4)))
    if rng.random() < 0.3:
        text = f"#### {rng.choice(PLACES)}\n{text}"
    return text + "\n"


def skill_probes(seed: int, n: int) -> dict[str, list[tuple[str, str]]]:
    """Held-out (prompt, expected continuation) pairs in the corpus's own forms, per skill: what
    a pretrained backbone should complete greedily (`scripts/pretrain_tiny.py` reports them).
"""
    rng = random.Random(f"probe-{seed}")
    probes: dict[str, list[tuple[str, str]]] = {k: [] for k in ("lookup", "copy", "arithmetic", "chain",
                                                                "story", "instruction", "sentiment")}
    for _ in range(n):
        facts = _facts(rng, 1 if rng.random() < 0.6 else 2)
        r, s, v = rng.choice(facts)
        context = " ".join(f"The {r_} of {s_} is {v_}." for r_, s_, v_ in facts)
        probes["lookup"].append((f"{context}\nQ: What is the {r} of {s}? A:", f" {v}"))
        span = _word_list(rng, 2, 6)
        probes["copy"].append((f"Copy: {span} =>", f" {span}"))
        (a, op, b, result), = arithmetic_chain(rng, rng.randint(1, 40), 1)[0]
        probes["arithmetic"].append((f"{a} {op} {b} =", f" {result}"))
        chain, final = arithmetic_chain(rng, rng.randint(1, 40), 2)
        expr = str(chain[0][0]) + "".join(f" {o} {b_}" for _, o, b_, _ in chain)
        probes["chain"].append((f"Compute {expr}.", f" {render_chain(chain)} So the result is {final}."))
        probes["story"].append(worked_story(rng, arithmetic_chain(rng, rng.randint(1, 40), 2)[0]))
        text, fn = rng.choice(_INSTRUCTIONS)
        words = _word_list(rng, 2, 5).split()
        probes["instruction"].append((f"Instruction: {text}\nInput: {' '.join(words)}\nOutput:", f" {fn(words)}"))
        good = rng.random() < 0.5
        adj = rng.choice(POSITIVE if good else NEGATIVE)
        probes["sentiment"].append((f"The {rng.choice(FOODS)} was {adj}, so {rng.choice(PEOPLE)} was",
                                    " happy" if good else " sad"))
    return probes


DOCS: dict[str, Callable[[random.Random], str]] = {
    "lookup": doc_lookup,
    "copy": doc_copy,
    "arithmetic": doc_arithmetic,
    "instruction": doc_instruction,
    "sentiment": doc_sentiment,
    "everyday": doc_everyday,
}
# How often each skill's documents occur (lookup and arithmetic are the hardest to learn).
MIX = {"lookup": 0.3, "copy": 0.16, "arithmetic": 0.26, "instruction": 0.08, "sentiment": 0.08, "everyday": 0.12}


def corpus_documents(seed: int, mix: dict[str, float] | None = None) -> Iterator[tuple[str, str]]:
    """An endless, seeded stream of (skill, document) pairs in the `mix` (default MIX) proportions."""
    mix = MIX if mix is None else mix
    rng = random.Random(f"corpus-{seed}")
    skills, weights = list(mix), list(mix.values())
    while True:
        skill = rng.choices(skills, weights)[0]
        yield skill, DOCS[skill](rng)
