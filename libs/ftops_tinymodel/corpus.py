"""Access to the shipped synthetic corpus (package data via importlib.resources)."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

_FILES = ("train.txt", "retention.jsonl", "new_facts.jsonl")


def _read(name: str) -> str:
    return (
        resources.files(__package__ or "ftops_tinymodel")
        .joinpath("corpus")
        .joinpath(name)
        .read_text(encoding="utf-8")
    )


def _jsonl(name: str) -> list[dict[str, str]]:
    return [
        {"prompt": row["prompt"], "completion": row["completion"]}
        for row in map(json.loads, _read(name).splitlines())
    ]


def train_texts() -> list[str]:
    """Pretraining facts, one sentence each."""
    return [line for line in _read("train.txt").splitlines() if line.strip()]


def retention_set() -> list[dict[str, str]]:
    """Prompt/completion pairs drawn from the pretraining facts (forgetting check)."""
    return _jsonl("retention.jsonl")


def new_facts() -> list[dict[str, str]]:
    """Prompt/completion pairs absent from pretraining (for adapters to teach)."""
    return _jsonl("new_facts.jsonl")


def corpus_hash() -> str:
    h = hashlib.sha256()
    for name in _FILES:
        h.update(name.encode() + b"\0" + _read(name).encode() + b"\0")
    return h.hexdigest()
