"""The small invented world of the synthetic downstream tasks (`peftrun/tasks/synthetic.py`),
shared with the pretraining corpus of their backbone (`scripts/synthetic_corpus.py`, read by
`scripts/pretrain_tiny.py`).

One module holds every name list and lexicon, so that the backbone pretrained on the corpus
and the tasks it is later adapted to speak of the same places, people, jobs and adjectives,
and the arithmetic steps and stories that both the corpus and the math task build on. What
differs is the *form*: the corpus has templates of its own, the tasks others (see
`scripts/synthetic_corpus.py`).

Everything is a function of a seed through `random.Random`: the same seed gives the same text
on every machine and Python version (3.2+ string seeding is stable).
"""

from __future__ import annotations

import random

# --------------------------------------------------------------------------------- the world
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
           "st", "tr", "sh"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "", "n", "r", "l", "m", "s"]


def _names(seed: int, count: int, min_syllables: int = 2, max_syllables: int = 2) -> list[str]:
    """`count` distinct capitalized invented names (fixed for a seed)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        n = rng.randint(min_syllables, max_syllables)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n - 1))
        name += rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        if name not in seen:
            seen.add(name)
            out.append(name.capitalize())
    return out


# Fixed pools: places (cities, countries) and people never share a name.
_ALL_NAMES = _names(7, 360)
PLACES: list[str] = _ALL_NAMES[:200]
PEOPLE: list[str] = _ALL_NAMES[200:]

COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "gray", "brown", "purple"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "goat", "crow", "bear", "wolf", "duck", "frog", "mouse"]
JOBS = ["baker", "farmer", "doctor", "singer", "sailor", "tailor", "miner", "painter", "teacher",
        "guard", "cook", "hunter"]
FOODS = ["soup", "bread", "tea", "cake", "rice", "fish", "pie", "salad", "cheese", "stew", "juice",
         "jam"]
ITEMS = ["apples", "coins", "shells", "stamps", "marbles", "eggs", "pens", "books", "cards", "stones"]
POSITIVE = ["tasty", "fresh", "warm", "sweet", "lovely", "crisp", "rich", "soft", "perfect", "fine",
            "great", "nice"]
NEGATIVE = ["stale", "cold", "bitter", "bland", "awful", "soggy", "burnt", "sour", "dry", "greasy",
            "bad", "salty"]
WORDS = COLORS + ANIMALS + JOBS + FOODS + ITEMS
# How a count changes in a story: "Mira buys 5 more." (+) or "Mira loses 3." (-).
GAIN = ["{p} buys {b} more.", "{p} finds {b} more.", "{p} wins {b} more.", "{p} gets {b} more."]
LOSS = ["{p} loses {b}.", "{p} sells {b}.", "{p} gives away {b}.", "{p} eats {b}."]


# ------------------------------------------------------- arithmetic steps and stories
def _step(rng: random.Random, value: int) -> tuple[str, int]:
    """One +/- step from `value` that keeps the result within 0..99."""
    if value > 5 and (value >= 80 or rng.random() < 0.5):
        b = rng.randint(1, min(value, 20))
        return "-", b
    return "+", rng.randint(1, min(20, 99 - value))


def arithmetic_chain(rng: random.Random, start: int, steps: int) -> tuple[list[tuple[int, str, int, int]], int]:
    """`steps` arithmetic steps from `start`: [(a, op, b, result), ...] and the final value."""
    out, value = [], start
    for _ in range(steps):
        op, b = _step(rng, value)
        result = value + b if op == "+" else value - b
        out.append((value, op, b, result))
        value = result
    return out, value


def render_chain(chain: list[tuple[int, str, int, int]]) -> str:
    """"7 + 5 = 12. 12 - 3 = 9." — the worked form both the corpus and the math task use."""
    return " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in chain)


def story(rng: random.Random, chain: list[tuple[int, str, int, int]]) -> tuple[str, str, str]:
    """A count that changes step by step: ("Mira has 7 eggs. Mira sells 3. Mira finds 5 more.",
    the person, the item)."""
    p, item = rng.choice(PEOPLE), rng.choice(ITEMS)
    changes = [rng.choice(GAIN if op == "+" else LOSS).format(p=p, b=b) for _, op, b, _ in chain]
    return " ".join([f"{p} has {chain[0][0]} {item}.", *changes]), p, item
