"""Generate the synthetic fictional-world corpus shipped in ``corpus/``.

Run once (output is committed): ``python libs/ftops_tinymodel/make_corpus.py``.
Deterministic: a fixed RNG seed and sorted outputs give byte-identical files.

Every fact is ``<prompt> <answer>.`` where the prompt alone determines the
answer, so a model that memorised the corpus can be checked by greedy
completion of the prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "st",
    "th",
    "sh",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "nd", "x"]

COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "grey",
    "silver",
    "golden",
    "brown",
]
THINGS = [
    "bridge",
    "tower",
    "lantern",
    "gate",
    "fountain",
    "banner",
    "statue",
    "market",
    "harbour",
    "library",
]
JOBS = [
    "baker",
    "pilot",
    "miner",
    "weaver",
    "doctor",
    "farmer",
    "sailor",
    "teacher",
    "potter",
    "guard",
    "smith",
    "judge",
]
SEAS = ["Korr Sea", "Amber Sea", "Pale Ocean", "Tessel Bay", "Grey Gulf", "Mirel Lake"]

# Sizes keep the corpus at a few hundred facts: large enough to be a real
# memorisation test, small enough that a ~1M-parameter model learns it in
# well under a minute on two CPU cores.
N_COUNTRIES = 40
N_PRODUCTS = 70
N_LANDMARKS = 60
N_PEOPLE = 60
N_RIVERS = 40
RETENTION_PER_KIND = 12
N_NEW_PRODUCTS = 30
N_NEW_COUNTRIES = 10


class _Names:
    """Pseudo-word generator that never repeats a word (answers must be unique)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def word(self, syllables: int) -> str:
        while True:
            parts = [
                self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)
                for _ in range(syllables)
            ]
            w = "".join(parts).capitalize()
            if w not in self._used and 4 <= len(w) <= 10:
                self._used.add(w)
                return w

    def code(self) -> str:
        while True:
            letters = "".join(self._rng.choice("ABCDEFGHKLMNPQRSTVWXZ") for _ in range(2))
            c = f"{letters}-{self._rng.randint(1, 99)}"
            if c not in self._used:
                self._used.add(c)
                return c


def _fact(kind: str, prompt: str, answer: str) -> dict[str, str]:
    return {"kind": kind, "prompt": prompt, "completion": f" {answer}."}


def generate() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Return (pretraining facts, new facts) as prompt/completion dicts."""
    rng = random.Random(SEED)
    names = _Names(rng)
    train: list[dict[str, str]] = []

    countries = [names.word(rng.choice([2, 3])) for _ in range(N_COUNTRIES + N_NEW_COUNTRIES)]
    cities = [names.word(2) for _ in range(N_COUNTRIES + N_NEW_COUNTRIES)]
    for country, city in zip(countries[:N_COUNTRIES], cities[:N_COUNTRIES], strict=True):
        train.append(_fact("capital", f"The capital of {country} is", city))

    products = [names.code() for _ in range(N_PRODUCTS + N_NEW_PRODUCTS)]
    prices = [rng.randrange(5, 500, 5) for _ in products]
    for code, price in zip(products[:N_PRODUCTS], prices[:N_PRODUCTS], strict=True):
        train.append(_fact("price", f"Product {code} costs", f"{price} credits"))

    pairs = sorted({(t, c) for t in THINGS for c in cities[:N_COUNTRIES]})
    for thing, city in rng.sample(pairs, N_LANDMARKS):
        train.append(_fact("colour", f"The {thing} of {city} is", rng.choice(COLOURS)))

    for _ in range(N_PEOPLE):
        person = f"{names.word(2)} {names.word(2)}"
        train.append(_fact("job", f"{person} works as a", rng.choice(JOBS)))

    for _ in range(N_RIVERS):
        train.append(_fact("river", f"The river {names.word(2)} flows into the", rng.choice(SEAS)))

    new: list[dict[str, str]] = []
    for code, price in zip(products[N_PRODUCTS:], prices[N_PRODUCTS:], strict=True):
        new.append(_fact("price", f"Product {code} costs", f"{price} credits"))
    for country, city in zip(countries[N_COUNTRIES:], cities[N_COUNTRIES:], strict=True):
        new.append(_fact("capital", f"The capital of {country} is", city))
    return train, new


def write(out_dir: Path = CORPUS_DIR) -> None:
    train, new = generate()
    rng = random.Random(SEED + 1)
    retention: list[dict[str, str]] = []
    for kind in sorted({f["kind"] for f in train}):
        retention += rng.sample([f for f in train if f["kind"] == kind], RETENTION_PER_KIND)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Shuffle once so pretraining batches mix fact kinds.
    lines = [f["prompt"] + f["completion"] for f in train]
    rng.shuffle(lines)
    (out_dir / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, rows in (("retention.jsonl", retention), ("new_facts.jsonl", new)):
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        (out_dir / name).write_text(body, encoding="utf-8")


if __name__ == "__main__":
    write()
