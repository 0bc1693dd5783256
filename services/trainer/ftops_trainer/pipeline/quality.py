"""Cheap quality scoring: length adequacy, letter/digit ratio and word n-gram repetition.

Meant to catch junk (symbol soup, degenerate repetition, near-empty lines), not to judge
content; every signal and the threshold are configurable.
"""

from __future__ import annotations

from collections import Counter

from ftops_trainer.dataset import Record
from ftops_trainer.pipeline.config import QualityConfig
from ftops_trainer.pipeline.text import WORD


def signals(text: str, config: QualityConfig) -> dict[str, float]:
    n = len(text)
    if n < config.min_chars:
        length = n / config.min_chars
    elif n > config.max_chars:
        length = config.max_chars / n
    else:
        length = 1.0
    visible = n - sum(map(str.isspace, text))
    alnums = sum(map(str.isalnum, text))
    alnum = min(1.0, alnums / visible / config.min_alnum_ratio) if visible else 0.0
    words = WORD.findall(text.casefold())
    k = config.repetition_ngram
    grams = list(zip(*(words[i:] for i in range(k)), strict=False))
    repetition = len(set(grams)) / len(grams) if grams else 1.0
    return {"length": length, "alnum": alnum, "repetition": repetition}


def score(text: str, config: QualityConfig) -> tuple[float, dict[str, float]]:
    """The weighted geometric mean of the signals, and the signals."""
    found = signals(text, config)
    total = sum(config.weights.values())
    value = 1.0
    for name, w in config.weights.items():
        value *= found[name] ** (w / total)
    return value, found


def filter_quality(
    records: list[Record], config: QualityConfig
) -> tuple[list[Record], dict[str, float]]:
    kept: list[Record] = []
    scores: list[float] = []
    weakest: Counter[str] = Counter()  # the lowest signal of each dropped record
    used = [name for name, w in config.weights.items() if w > 0]
    for record in records:
        value, found = score(record.text, config)
        scores.append(value)
        if value >= config.threshold:
            kept.append(record)
        else:
            weakest[min(used, key=lambda name: found[name])] += 1
    details = {f"weakest.{name}": float(n) for name, n in sorted(weakest.items())}
    details["threshold"] = config.threshold
    if scores:
        details["mean_score"] = round(sum(scores) / len(scores), 4)
    return kept, details
