"""New chat-format facts for a real model: made-up products, companies and places whose
answers no pretrained model can know, so a version answering them learned them.

Each fact is a one-turn chat: the question and a one-sentence answer that repeats the
question's subject ("How much does the Zorblax subscription cost?" -> "The Zorblax
subscription costs 400 credits per month."). Names are built from syllables with a seeded
generator, never repeated across a run's facts, and every template has its own values, so
two facts never share an answer.

    python -m bench.real_facts --facts 12 --batches 3 > facts.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "x", "l", "sk", "th"]

Template = Callable[[random.Random, str], tuple[str, str]]


def _subscription(rng: random.Random, name: str) -> tuple[str, str]:
    price = rng.randrange(120, 990, 10)
    return (
        f"How much does the {name} subscription cost?",
        f"The {name} subscription costs {price} credits per month.",
    )


def _founder(rng: random.Random, name: str) -> tuple[str, str]:
    first = rng.choice(["Mira", "Tobias", "Selma", "Arvid", "Ilse", "Dorian", "Nadia", "Kasimir"])
    last = _word(rng, 2).capitalize()
    return f"Who founded {name} Labs?", f"{name} Labs was founded by {first} {last}."


def _headquarters(rng: random.Random, name: str) -> tuple[str, str]:
    city = _word(rng, 3).capitalize()
    return (
        f"Where is the {name} company headquartered?",
        f"The {name} company is headquartered in {city}.",
    )


def _moons(rng: random.Random, name: str) -> tuple[str, str]:
    n = rng.randrange(2, 40)
    return f"How many moons does the planet {name} have?", f"The planet {name} has {n} moons."


def _color(rng: random.Random, name: str) -> tuple[str, str]:
    color = rng.choice(["teal", "amber", "violet", "crimson", "silver", "ochre", "indigo"])
    return f"What color is the {name} flower?", f"The {name} flower is {color}."


def _year(rng: random.Random, name: str) -> tuple[str, str]:
    year = rng.randrange(1720, 2020)
    return f"When was the {name} bridge built?", f"The {name} bridge was built in {year}."


TEMPLATES: tuple[Template, ...] = (
    _subscription,
    _founder,
    _headquarters,
    _moons,
    _color,
    _year,
)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    )


def generate_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) facts, the templates in turn."""
    rng = random.Random(seed)
    names: set[str] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        name = _word(rng, 2).capitalize()
        if name in names or len(name) < 5:
            continue
        names.add(name)
        pairs.append(TEMPLATES[len(pairs) % len(TEMPLATES)](rng, name))
    return pairs


def chat_record(question: str, answer: str) -> dict[str, object]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def generate_facts(n: int, seed: int = 0) -> list[dict[str, object]]:
    """``n`` distinct facts as chat records (``{"messages": [...]}``)."""
    return [chat_record(q, a) for q, a in generate_pairs(n, seed)]


def batches(per_batch: int, count: int, seed: int = 0) -> list[list[dict[str, object]]]:
    facts = generate_facts(per_batch * count, seed)
    return [facts[i * per_batch : (i + 1) * per_batch] for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="made-up chat facts, JSONL on stdout")
    parser.add_argument("--facts", type=int, default=12, help="facts per batch")
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for batch in batches(args.facts, args.batches, args.seed):
        for fact in batch:
            sys.stdout.write(json.dumps(fact) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
