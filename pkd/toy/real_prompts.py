"""Real chat prompts for the real-model demo (`pkd demo --real`): a few hundred short requests of
several kinds, built deterministically from templates so that the repository carries their
recipe, not a data file.

Kinds: factual questions, rewriting, small arithmetic, lists, definitions, short how-to advice
and word facts — the everyday requests an instruct model of 135M parameters can answer in a
sentence or two. Every prompt has a stable id (set, kind, index); the held-out prompts are
drawn from the same kinds, in the same proportions, and are disjoint from the training prompts.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

COUNTRIES = ("France", "Japan", "Italy", "Spain", "Canada", "Egypt", "Brazil", "Germany", "India", "Kenya",
             "Mexico", "Norway", "Peru", "Greece", "Australia", "China", "Sweden", "Chile", "Turkey", "Poland")  # fmt: skip
THINGS = ("the sun", "a volcano", "the moon", "rain", "a rainbow", "thunder", "snow", "wind", "a glacier",
          "an earthquake", "a tide", "a comet", "fog", "a desert", "a river")  # fmt: skip
FACT_TEMPLATES = ("What is the capital of {c}?", "What language do people speak in {c}?",
                  "Name a famous food from {c}.", "What continent is {c} on?")  # fmt: skip
SCIENCE_TEMPLATES = ("Why does {t} happen?", "Explain {t} to a child in one sentence.", "What is {t} made of?")
SENTENCES = ("I walk to school every day.", "She reads a book before bed.", "They play football in the park.",
             "We cook dinner together.", "He writes a letter to his friend.", "The cat sleeps on the sofa.",
             "My brother fixes old bikes.", "The children sing a song.", "I drink coffee in the morning.",
             "She paints the fence green.", "The dog chases the ball.", "We visit our grandparents on Sunday.")  # fmt: skip
REWRITE_TEMPLATES = ("Rewrite in the past tense: {s}", "Make this sentence more formal: {s}",
                     "Rewrite this sentence as a question: {s}", "Translate into French: {s}")  # fmt: skip
LIST_TOPICS = ("fruits", "vegetables", "animals that live in the sea", "colours", "musical instruments",
               "sports played with a ball", "things to pack for a beach trip", "kitchen tools", "birds",
               "board games", "planets", "jobs in a hospital", "flowers", "winter clothes")  # fmt: skip
LIST_TEMPLATES = ("List three {x}.", "Name five {x}.")
WORDS = ("kindness", "gravity", "democracy", "photosynthesis", "friendship", "recycling", "electricity",
         "a library", "an island", "a vaccine", "a budget", "an alphabet", "a dictionary", "a bridge",
         "a galaxy", "a habit", "patience", "a recipe", "a museum", "an orchestra")  # fmt: skip
DEFINE_TEMPLATES = ("What is {w}?", "Define {w} in simple words.")
TASKS = ("sleep better", "learn a new language", "save money", "make new friends", "stay focused while studying",
         "keep a plant alive", "prepare for a job interview", "drink more water", "start running",
         "write a good email", "cook rice", "remember names", "reduce stress", "organise a desk")  # fmt: skip
ADVICE_TEMPLATES = ("Give me one tip to {a}.", "How can I {a}?")
WORD_FACTS = ("What is the opposite of {o}?", "Give a synonym for {o}.", "Use the word '{o}' in a sentence.")
OPPOSITES = ("hot", "happy", "fast", "tall", "early", "loud", "bright", "strong", "empty", "ancient",
             "generous", "simple", "quiet", "brave")  # fmt: skip
KINDS = ("fact", "science", "rewrite", "arithmetic", "list", "define", "advice", "words")


def _arithmetic(rng: random.Random) -> Iterator[str]:
    """Small sums, differences and products, phrased a few ways (an endless, seeded stream)."""
    forms = ("What is {a} plus {b}?", "What is {a} minus {b}?", "What is {a} times {b}?",
             "If I have {a} apples and buy {b} more, how many do I have?", "Compute {a} + {b}.")  # fmt: skip
    while True:
        yield rng.choice(forms).format(a=rng.randint(2, 40), b=rng.randint(2, 12))


def _kind_prompts(kind: str, rng: random.Random) -> list[str]:
    """Every distinct prompt of one kind (arithmetic: 60 distinct draws), in a seeded order."""
    product = itertools.product
    if kind == "arithmetic":
        found: dict[str, None] = {}
        for text in _arithmetic(rng):
            found.setdefault(text)
            if len(found) == 60:
                return list(found)
    texts = {
        "fact": [t.format(c=c) for t, c in product(FACT_TEMPLATES, COUNTRIES)],
        "science": [t.format(t=x) for t, x in product(SCIENCE_TEMPLATES, THINGS)],
        "rewrite": [t.format(s=s) for t, s in product(REWRITE_TEMPLATES, SENTENCES)],
        "list": [t.format(x=x) for t, x in product(LIST_TEMPLATES, LIST_TOPICS)],
        "define": [t.format(w=w) for t, w in product(DEFINE_TEMPLATES, WORDS)],
        "advice": [t.format(a=a) for t, a in product(ADVICE_TEMPLATES, TASKS)],
        "words": [t.format(o=o) for t, o in product(WORD_FACTS, OPPOSITES)],
    }[kind]
    rng.shuffle(texts)
    return texts


def _round_robin(pools: dict[str, list[str]], n: int, *, from_end: bool) -> list[tuple[str, str]]:
    """Up to `n` (kind, text) pairs taken from the pools in turn, one kind after another, and
    removed from them (from the end of each pool, or from its start)."""
    out: list[tuple[str, str]] = []
    while len(out) < n and any(pools.values()):
        for kind, pool in pools.items():
            if pool and len(out) < n:
                out.append((kind, pool.pop() if from_end else pool.pop(0)))
    return out


def chat_prompts(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """`n_train` and `n_heldout` prompt records (`{"id", "prompt", "kind"}`), disjoint by text,
    the kinds taken in turn so that every set of at least len(KINDS) prompts has all of them.
    Raises ValueError when the templates hold fewer distinct prompts than asked for."""
    rng = random.Random(seed)
    pools = {kind: _kind_prompts(kind, rng) for kind in KINDS}
    total = sum(map(len, pools.values()))
    if n_train + n_heldout > total:
        raise ValueError(f"asked for {n_train} + {n_heldout} prompts; the templates hold {total}")
    heldout = _round_robin(pools, n_heldout, from_end=True)
    train = _round_robin(pools, n_train, from_end=False)
    ids = {kind: itertools.count() for kind in KINDS}

    def record(kind: str, text: str, split: str) -> dict[str, str]:
        return {"id": f"{split}-{kind}-{next(ids[kind]):03d}", "prompt": text, "kind": kind}

    return [record(k, t, "train") for k, t in train], [record(k, t, "heldout") for k, t in heldout]
