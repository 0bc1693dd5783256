"""JSONL training data: parsing, validation with a per-line report, and tokenisation.

The whole file is read and checked before any training starts, so a user sees every bad
line at once (with its 1-based line number) instead of one failure per attempt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from ftops_runtime.errors import InvalidArgument

# Labels with this value are ignored by the cross-entropy loss (torch/HF convention).
IGNORE_INDEX = -100
# A report naming a million bad lines helps nobody; the count still covers them all.
MAX_REPORTED_LINES = 100


@dataclass(frozen=True)
class Record:
    """One training example. ``prompt`` is empty for the plain ``{"text": ...}`` format:
    then the loss covers the whole text."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based
    reason: str


@dataclass
class ParsedDataset:
    records: list[Record] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def total(self) -> int:
        """Non-blank lines: the records plus the bad lines."""
        return len(self.records) + len(self.errors)

    def report(self, limit: int = MAX_REPORTED_LINES) -> str:
        lines = [f"line {e.line}: {e.reason}" for e in self.errors[:limit]]
        if len(self.errors) > limit:
            lines.append(f"... and {len(self.errors) - limit} more bad lines")
        return "\n".join(lines)


class DatasetError(InvalidArgument):
    """The dataset cannot be trained on; the message carries the per-line report."""


def _string_field(obj: dict[str, Any], key: str, *, allow_empty: bool = False) -> str | None:
    """The field's value, or None when it is not a usable string."""
    value = obj.get(key)
    if not isinstance(value, str):
        return None
    if not allow_empty and not value.strip():
        return None
    return value


def _parse_line(text: str) -> Record | str:
    """A record, or the reason the line is bad."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    has_text = "text" in obj
    has_pair = "prompt" in obj or "completion" in obj
    if has_text and has_pair:
        return 'ambiguous format: use either "text" or "prompt"/"completion", not both'
    if has_text:
        value = _string_field(obj, "text")
        if value is None:
            return '"text" must be a non-empty string'
        return Record(prompt="", completion=value)
    if has_pair:
        prompt = _string_field(obj, "prompt")
        completion = _string_field(obj, "completion")
        if prompt is None:
            return '"prompt" must be a non-empty string'
        if completion is None:
            return '"completion" must be a non-empty string'
        return Record(prompt=prompt, completion=completion)
    keys = ", ".join(sorted(obj)) or "none"
    return f'unknown format: expected "text" or "prompt"+"completion" (keys: {keys})'


def parse_jsonl(data: bytes) -> ParsedDataset:
    """Parse every line; bad lines are collected, never raised. Blank lines are ignored.

    Extra keys next to the recognised ones (ids, tags) are allowed and ignored.
    """
    parsed = ParsedDataset(fingerprint=hashlib.sha256(data).hexdigest())
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            parsed.errors.append(LineError(number, f"not valid UTF-8 (byte {exc.start + 1})"))
            continue
        if not text.strip():
            continue
        result = _parse_line(text)
        if isinstance(result, Record):
            parsed.records.append(result)
        else:
            parsed.errors.append(LineError(number, result))
    return parsed


def load_dataset(data: bytes, max_bad_line_ratio: float) -> ParsedDataset:
    """Parse and enforce the bad-line threshold: above it (or with nothing usable) the
    dataset is rejected with the full report; below it the bad lines are just skipped."""
    parsed = parse_jsonl(data)
    if parsed.total == 0:
        raise DatasetError("dataset is empty: expected JSONL with one object a line")
    bad = len(parsed.errors)
    if not parsed.records:
        raise DatasetError(f"dataset has no usable line ({bad} bad):\n{parsed.report()}")
    if bad / parsed.total > max_bad_line_ratio:
        raise DatasetError(
            f"dataset has {bad} bad lines out of {parsed.total} "
            f"({bad / parsed.total:.1%} > {max_bad_line_ratio:.1%} allowed):\n{parsed.report()}"
        )
    return parsed


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer this module uses."""

    @property
    def eos_token_id(self) -> int | None: ...

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize(record: Record, tokenizer: Tokenizer, cutoff_len: int) -> Example | None:
    """Token ids and labels for one record, or None when nothing trainable survives the
    cutoff (a prompt longer than ``cutoff_len``).

    Prompt and completion are tokenised separately, so the mask boundary is exact and the
    completion tokens are the ones the model must produce after the prompt at inference.
    EOS ends every example so the model learns to stop.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the base model's tokenizer has no EOS token")
    if record.prompt:
        prompt_ids: list[int] = list(tokenizer(record.prompt)["input_ids"])
        completion_ids = list(tokenizer(record.completion, add_special_tokens=False)["input_ids"])
        input_ids = prompt_ids + completion_ids + [eos]
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [eos]
    else:
        input_ids = [*tokenizer(record.completion)["input_ids"], eos]
        labels = list(input_ids)
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    # The first position never gets a loss (nothing predicts it); need one more.
    if sum(1 for label in labels[1:] if label != IGNORE_INDEX) == 0:
        return None
    return Example(input_ids=input_ids, labels=labels)
