"""The text views of a record the stages agree on."""

from __future__ import annotations

import hashlib
import re

from ftops_trainer.dataset import Record

WORD = re.compile(r"\w+")


def parts(record: Record) -> list[tuple[str, str]]:
    """(role, content) pieces: the chat turns, or prompt/completion, or the text."""
    if record.messages:
        return list(record.messages)
    if record.prompt:
        return [("prompt", record.prompt), ("completion", record.completion)]
    return [("text", record.completion)]


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def exact_key(record: Record) -> bytes:
    """Equal for records that differ only in case and whitespace; roles count, so a
    question and the same words as an answer differ."""
    joined = "\u241e".join(f"{role}\u241f{normalise(content)}" for role, content in parts(record))
    return hashlib.blake2b(joined.encode(), digest_size=16).digest()


def near_dup_text(record: Record) -> str:
    """System prompts are left out: one shared by every chat would make all of them
    look alike."""
    if not record.messages:
        return record.text
    return "\n".join(content for role, content in parts(record) if role != "system")
