"""Text cleaning: NFC, control characters removed, whitespace runs normalised.

Leading whitespace of a line is kept (code indentation, and the space that opens a
completion and decides its first token); trailing spaces before a newline go; runs of
blank lines shrink to one blank line.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace
from itertools import chain

from ftops_trainer.dataset import Record

_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x85]")
# Control characters (Cc) go, except newline and tab; the whitespace-like ones become a
# space so the words they separated stay apart. Zero-width space and BOM go too.
_CONTROL: dict[int, str | None] = {
    c: None for c in chain(range(0x00, 0x20), range(0x7F, 0xA0)) if c not in (0x09, 0x0A)
}
_CONTROL.update({c: " " for c in (0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x1F)})
_CONTROL.update({0x200B: None, 0xFEFF: None})
_TRAILING = re.compile(r"[^\S\n]+(?=\n)")
# After a non-space: a run of 2+ whitespace, or one odd space (NBSP, ideographic...).
_INNER_RUN = re.compile(r"(?<=\S)(?:[^\S\n]{2,}|[^\S\n \t])")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = _LINE_BREAKS.sub("\n", text).translate(_CONTROL)
    text = _TRAILING.sub("", text)
    text = _INNER_RUN.sub(" ", text)
    return _BLANK_LINES.sub("\n\n", text)


def _clean_record(record: Record) -> Record | None:
    """The cleaned record, or None when a required field is left empty."""
    if record.messages:
        turns = tuple((role, clean_text(content)) for role, content in record.messages)
        if any(not content.strip() for _, content in turns):
            return None
        return replace(record, messages=turns)
    prompt, completion = clean_text(record.prompt), clean_text(record.completion)
    if not completion.strip() or (record.prompt and not prompt.strip()):
        return None
    return replace(record, prompt=prompt, completion=completion)


def clean(records: list[Record]) -> tuple[list[Record], dict[str, float]]:
    kept: list[Record] = []
    changed = emptied = 0
    for record in records:
        cleaned = _clean_record(record)
        if cleaned is None:
            emptied += 1
            continue
        changed += cleaned != record
        kept.append(cleaned)
    return kept, {"changed": changed, "dropped_empty": emptied}
