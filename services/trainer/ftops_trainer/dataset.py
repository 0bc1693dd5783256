"""JSONL training data: parsing, validation with a per-line report, and tokenisation.

The whole file is read and checked before any training starts, so a user sees every bad
line at once (with its 1-based line number) instead of one failure per attempt.

Formats, one JSON object a line (extra keys such as ids or tags are ignored):

- ``{"text": ...}``: plain text, the loss covers all of it.
- ``{"prompt": ..., "completion": ...}``: a raw continuation; loss on the completion.
- ``{"instruction": ..., "input": ..., "output": ...}`` (alpaca; ``input`` optional):
  becomes a chat with one user turn (instruction, a blank line, input) and one assistant
  turn (output), as LLaMA-Factory does, so it gets the model's chat format.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: roles system (first only),
  user and assistant, at least one assistant turn; loss on the assistant turns.

Optional fields used by the data pipeline: a category (``"category"``, a string) and a
timestamp (``"timestamp"``, ISO-8601 or unix seconds; naive ISO times are UTC).

Chats are rendered with the tokenizer's chat template when it has one. Otherwise the
default template applies, ``DEFAULT_CHAT_TEMPLATE`` (BOS comes from the tokenizer)::

    <|system|>\\n{content}\\n      system and user turns
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}</s>  assistant turns end with EOS instead of a newline

``train_on_prompt=True`` puts the loss on every token instead (headers included).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from ftops_runtime.errors import InvalidArgument

# Labels with this value are ignored by the cross-entropy loss (torch/HF convention).
IGNORE_INDEX = -100
# A report naming a million bad lines helps nobody; the count still covers them all.
MAX_REPORTED_LINES = 100
# The whole file is held in memory while it is parsed; callers may pass their own limit.
DEFAULT_MAX_BYTES = 1 << 30
ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

Overlong = Literal["truncate", "refuse"]
REASON_TOO_LONG = "longer than cutoff_len"
REASON_NO_TARGET = "no completion token within cutoff_len"
REASON_TEMPLATE = "the chat template does not render assistant turns as a prefix"


@dataclass(frozen=True)
class Record:
    """One training example. ``prompt`` is empty for the plain ``{"text": ...}`` format:
    then the loss covers the whole text. A chat keeps its turns in ``messages`` (role,
    content) and leaves prompt/completion empty. ``weight`` scales the example's loss."""

    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    category: str = ""
    timestamp: float | None = None  # unix seconds
    weight: float = 1.0

    def __post_init__(self) -> None:
        # A JSON round trip (the replay buffer) hands the turns back as lists; tuples keep
        # records comparable and hashable.
        turns = self.messages
        if type(turns) is not tuple or any(type(t) is not tuple for t in turns):
            object.__setattr__(self, "messages", tuple((r, c) for r, c in turns))

    @property
    def text(self) -> str:
        """All the content, for scoring and deduplication (no template, no roles)."""
        if self.messages:
            return "\n".join(content for _, content in self.messages)
        return f"{self.prompt}\n{self.completion}" if self.prompt else self.completion


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


# --- parsing -------------------------------------------------------------------------

# (kind, how the error messages name it, its keys)
_FORMATS = (
    ("text", '"text"', ("text",)),
    ("pair", '"prompt"/"completion"', ("prompt", "completion")),
    ("alpaca", '"instruction"/"input"/"output"', ("instruction", "input", "output")),
    ("chat", '"messages"', ("messages",)),
)


def _string_field(obj: dict[str, Any], key: str, *, allow_empty: bool = False) -> str | None:
    """The field's value, or None when it is not a usable string."""
    value = obj.get(key)
    if not isinstance(value, str):
        return None
    if not allow_empty and not value.strip():
        return None
    return value


def _parse_messages(value: Any) -> tuple[tuple[str, str], ...] | str:
    if not isinstance(value, list) or not value:
        return '"messages" must be a non-empty list'
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f'{where} must be an object with "role" and "content"'
        role = message["role"]
        if not isinstance(role, str):
            return f'{where}: "role" must be a string'
        if role not in ROLES:
            return f'{where}: unknown role "{role}" (expected system, user or assistant)'
        if role == "system" and i > 0:
            return f"{where}: a system message is only allowed first"
        content = _string_field(message, "content")
        if content is None:
            return f'{where}: "content" must be a non-empty string'
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        return '"messages" has no assistant turn: nothing to train on'
    return tuple(turns)


def _parse_alpaca(obj: dict[str, Any]) -> tuple[tuple[str, str], ...] | str:
    instruction = _string_field(obj, "instruction")
    if instruction is None:
        return '"instruction" must be a non-empty string'
    extra = obj.get("input", "")
    if not isinstance(extra, str):
        return '"input" must be a string'
    output = _string_field(obj, "output")
    if output is None:
        return '"output" must be a non-empty string'
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return (("user", user), ("assistant", output))


def _parse_timestamp(value: Any) -> float | None:
    """Unix seconds from an ISO-8601 string or a number; None when unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return None


def _parse_line(text: str, category_key: str, timestamp_key: str) -> Record | str:
    """A record, or the reason the line is bad."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # Some of json's messages end in "at" ("Unterminated string starting at").
        return f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    found = [(kind, label) for kind, label, keys in _FORMATS if any(k in obj for k in keys)]
    if len(found) > 1:
        labels = " and ".join(label for _, label in found)
        return f"ambiguous format: has keys of {labels}; use one format a line"
    if not found:
        keys = ", ".join(sorted(obj)) or "none"
        return (
            'unknown format: expected "text", "prompt"+"completion", '
            f'"instruction"+"output" or "messages" (keys: {keys})'
        )
    category = obj.get(category_key, "")
    if not isinstance(category, str):
        return f'"{category_key}" must be a string'
    timestamp = None
    if obj.get(timestamp_key) is not None:
        timestamp = _parse_timestamp(obj[timestamp_key])
        if timestamp is None:
            return f'"{timestamp_key}" must be an ISO-8601 string or unix seconds'
    meta: dict[str, Any] = {"category": category, "timestamp": timestamp}
    kind = found[0][0]
    if kind == "text":
        value = _string_field(obj, "text")
        if value is None:
            return '"text" must be a non-empty string'
        return Record(prompt="", completion=value, **meta)
    if kind in ("chat", "alpaca"):
        turns = _parse_messages(obj["messages"]) if kind == "chat" else _parse_alpaca(obj)
        return turns if isinstance(turns, str) else Record(messages=turns, **meta)
    prompt = _string_field(obj, "prompt")
    completion = _string_field(obj, "completion")
    if prompt is None:
        return '"prompt" must be a non-empty string'
    if completion is None:
        return '"completion" must be a non-empty string'
    return Record(prompt=prompt, completion=completion, **meta)


def parse_jsonl(
    data: bytes, *, category_key: str = "category", timestamp_key: str = "timestamp"
) -> ParsedDataset:
    """Parse every line; bad lines are collected, never raised. Blank lines are ignored."""
    parsed = ParsedDataset(fingerprint=hashlib.sha256(data).hexdigest())
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            parsed.errors.append(LineError(number, f"not valid UTF-8 (byte {exc.start + 1})"))
            continue
        if not text.strip():
            continue
        result = _parse_line(text, category_key, timestamp_key)
        if isinstance(result, Record):
            parsed.records.append(result)
        else:
            parsed.errors.append(LineError(number, result))
    return parsed


def _not_jsonl_hint(data: bytes, parsed: ParsedDataset) -> str:
    """Why a file with no usable line is probably not JSONL at all ("" when unsure)."""
    head = data.lstrip()[:4]
    if head.startswith(b"\x1f\x8b"):
        return "the file is gzip-compressed: decompress it first"
    if head.startswith(b"PAR1"):
        return "the file is Parquet, not JSONL"
    if head.startswith(b"["):
        return "the file looks like a JSON array: put one object on each line (JSONL)"
    if all(e.reason.startswith(("invalid JSON", "not valid UTF-8")) for e in parsed.errors):
        return "the file is not JSONL: expected one JSON object a line"
    return ""


def load_dataset(
    data: bytes,
    max_bad_line_ratio: float,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    category_key: str = "category",
    timestamp_key: str = "timestamp",
) -> ParsedDataset:
    """Parse and enforce the size limit and the bad-line threshold: above it (or with
    nothing usable) the dataset is rejected with the full report; below it the bad lines
    are just skipped."""
    if max_bytes is not None and len(data) > max_bytes:
        raise DatasetError(
            f"dataset is {len(data):,} bytes, over the {max_bytes:,}-byte limit: "
            "split it or raise the limit"
        )
    parsed = parse_jsonl(data, category_key=category_key, timestamp_key=timestamp_key)
    if parsed.total == 0:
        raise DatasetError("dataset is empty: expected JSONL with one object a line")
    bad = len(parsed.errors)
    if not parsed.records:
        hint = _not_jsonl_hint(data, parsed)
        hint = f"{hint}\n" if hint else ""
        raise DatasetError(f"dataset has no usable line ({bad} bad):\n{hint}{parsed.report()}")
    if bad / parsed.total > max_bad_line_ratio:
        raise DatasetError(
            f"dataset has {bad} bad lines out of {parsed.total} "
            f"({bad / parsed.total:.1%} > {max_bad_line_ratio:.1%} allowed):\n{parsed.report()}"
        )
    return parsed


# --- tokenisation --------------------------------------------------------------------


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer this module uses. ``bos_token_id``,
    ``chat_template`` and ``apply_chat_template`` are used when present."""

    @property
    def eos_token_id(self) -> int | None: ...

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    weight: float = 1.0  # scales this example's loss (time decay)
    truncated: bool = False  # longer than cutoff_len, cut to fit


@dataclass(frozen=True)
class Refusal:
    """Why a record yields no example; ``reason`` is one of the REASON_* constants."""

    reason: str


@dataclass
class TokenizeReport:
    examples: list[Example] = field(default_factory=list)
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> records

    def summary(self) -> str:
        parts = [f"{len(self.examples)} examples", f"{self.truncated} truncated"]
        parts += [f"{n} dropped: {reason}" for reason, n in sorted(self.dropped.items())]
        return ", ".join(parts)


# A piece of the token sequence and whether the loss covers it.
_Segment = tuple[list[int], bool]


def _ids(tokenizer: Tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _pair_segments(record: Record, tokenizer: Tokenizer, eos: int) -> list[_Segment]:
    # Prompt and completion are tokenised separately, so the mask boundary is exact and
    # the completion tokens are the ones the model must produce after the prompt.
    if not record.prompt:
        return [([*_ids(tokenizer, record.completion, special=True), eos], True)]
    return [
        (_ids(tokenizer, record.prompt, special=True), False),
        ([*_ids(tokenizer, record.completion, special=False), eos], True),
    ]


def _default_chat_segments(
    messages: Sequence[tuple[str, str]], tokenizer: Tokenizer, eos: int
) -> list[_Segment]:
    segments: list[_Segment] = []
    pending = ""  # untrained text not yet tokenised

    def flush() -> None:
        nonlocal pending
        if pending:
            segments.append((_ids(tokenizer, pending, special=not segments), False))
            pending = ""

    for role, content in messages:
        pending += f"<|{role}|>\n"
        if role == "assistant":
            flush()
            segments.append(([*_ids(tokenizer, content, special=False), eos], True))
        else:
            pending += f"{content}\n"
    flush()
    return segments


def _render(tokenizer: Any, messages: Sequence[tuple[str, str]], generation: bool) -> str | None:
    try:
        text = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages],
            tokenize=False,
            add_generation_prompt=generation,
        )
    # Templates raise what they like (jinja errors, ValueError on an empty chat): such a
    # prefix is simply not usable as a boundary.
    except Exception:
        return None
    return text if isinstance(text, str) else None


def _prefix_len(full: str, tokenizer: Any, messages: Sequence[tuple[str, str]]) -> int | None:
    """Where the next assistant turn starts in ``full``: after ``messages`` plus the
    generation prompt when the template has one (so the role header stays masked)."""
    for generation in (True, False):
        text = _render(tokenizer, messages, generation)
        if text is not None and full.startswith(text):
            return len(text)
    return None


def _template_chat_segments(
    messages: Sequence[tuple[str, str]], tokenizer: Any
) -> list[_Segment] | Refusal:
    """Assistant spans found by rendering growing prefixes of the chat: the span of turn
    i starts where ``messages[:i]`` (plus the generation prompt) ends and stops where
    ``messages[:i + 1]`` ends. A turn whose prefixes are not prefixes of the full render
    (templates that rewrite history) stays masked."""
    full = _render(tokenizer, messages, generation=False)
    if full is None:
        return Refusal(REASON_TEMPLATE)
    spans: list[tuple[int, int]] = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        last = i == len(messages) - 1
        upto = full if last else _render(tokenizer, messages[: i + 1], generation=False)
        start = _prefix_len(full, tokenizer, messages[:i])
        if start is None and i == 0:
            start = 0  # HF refuses to render an empty chat
        if upto is None or start is None or not full.startswith(upto):
            continue
        if start < len(upto) and (not spans or spans[-1][1] <= start):
            spans.append((start, len(upto)))
    if not spans:
        return Refusal(REASON_TEMPLATE)
    segments: list[_Segment] = []
    cursor = 0
    for start, end in spans:
        for text, trained in ((full[cursor:start], False), (full[start:end], True)):
            if text:
                segments.append((_ids(tokenizer, text, special=False), trained))
        cursor = end
    if full[cursor:]:
        segments.append((_ids(tokenizer, full[cursor:], special=False), False))
    return segments


def _segments(record: Record, tokenizer: Tokenizer, eos: int) -> list[_Segment] | Refusal:
    if not record.messages:
        return _pair_segments(record, tokenizer, eos)
    if getattr(tokenizer, "chat_template", None):
        return _template_chat_segments(record.messages, tokenizer)
    return _default_chat_segments(record.messages, tokenizer, eos)


def generation_prefix(record: Record, tokenizer: Tokenizer) -> tuple[list[int], str] | None:
    """The token ids a model continues from and the text it should produce, for greedy
    exact match: a pair's prompt and completion, or a chat rendered as training renders it
    up to its last assistant turn (the generation prompt included) and that turn's content.
    None for plain text, a chat that does not end with the assistant, or a template that
    gives no boundary."""
    if not record.messages:
        return (
            (_ids(tokenizer, record.prompt, special=True), record.completion)
            if record.prompt
            else None
        )
    role, content = record.messages[-1]
    eos = tokenizer.eos_token_id
    if role != "assistant" or eos is None:
        return None
    segments = _segments(record, tokenizer, eos)
    if isinstance(segments, Refusal) or not segments or not segments[-1][1]:
        return None  # the last assistant turn is not the last span training scores
    prefix = [token for ids, _ in segments[:-1] for token in ids]
    return (prefix, content) if prefix else None


def _fit(ids: list[int], tail_start: int, head: int, cutoff_len: int) -> list[int]:
    """Indices kept so ``ids`` fits ``cutoff_len``: the first ``head`` tokens (BOS), the
    end of the prompt, and the tail from ``tail_start`` (the last trained span). The tail
    survives whole when it fits; else the prompt keeps half the window as context and the
    tail is cut at the end."""
    head = min(head, tail_start)  # text format: the tail starts at BOS
    prompt_len = tail_start - head
    room = cutoff_len - head
    keep = max(room - (len(ids) - tail_start), min(prompt_len, room // 2))
    keep = min(max(keep, 0), prompt_len)
    kept = [*range(head), *range(tail_start - keep, len(ids))]
    return kept[:cutoff_len]


def encode(
    record: Record,
    tokenizer: Tokenizer,
    cutoff_len: int,
    *,
    train_on_prompt: bool = False,
    overlong: Overlong = "truncate",
) -> Example | Refusal:
    """Token ids and labels for one record, or why it yields none.

    EOS ends every completion/assistant turn so the model learns to stop. Longer than
    ``cutoff_len``: ``overlong="truncate"`` keeps BOS, the tail of the prompt and the
    completion (see ``_fit``) and marks the example ``truncated``; ``"refuse"`` returns
    ``Refusal(REASON_TOO_LONG)``.
    """
    if overlong not in ("truncate", "refuse"):
        raise ValueError(f'overlong must be "truncate" or "refuse", not {overlong!r}')
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the base model's tokenizer has no EOS token")
    segments = _segments(record, tokenizer, eos)
    if isinstance(segments, Refusal):
        return segments
    input_ids: list[int] = []
    labels: list[int] = []
    tail_start = 0
    for ids, trained in segments:
        if trained:
            tail_start = len(input_ids)
        input_ids += ids
        labels += ids if trained or train_on_prompt else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > cutoff_len
    if truncated:
        if overlong == "refuse":
            return Refusal(REASON_TOO_LONG)
        bos = getattr(tokenizer, "bos_token_id", None)
        head = 1 if bos is not None and input_ids[:1] == [bos] else 0
        kept = _fit(input_ids, tail_start, head, cutoff_len)
        input_ids, labels = [input_ids[i] for i in kept], [labels[i] for i in kept]
    # The first position never gets a loss (nothing predicts it); need one more.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return Refusal(REASON_NO_TARGET)
    return Example(input_ids, labels, weight=record.weight, truncated=truncated)


def tokenize(
    record: Record,
    tokenizer: Tokenizer,
    cutoff_len: int,
    *,
    train_on_prompt: bool = False,
    overlong: Overlong = "truncate",
) -> Example | None:
    """``encode`` for callers that only skip what yields no example."""
    result = encode(
        record, tokenizer, cutoff_len, train_on_prompt=train_on_prompt, overlong=overlong
    )
    return result if isinstance(result, Example) else None


def tokenize_all(
    records: Iterable[Record],
    tokenizer: Tokenizer,
    cutoff_len: int,
    *,
    train_on_prompt: bool = False,
    overlong: Overlong = "truncate",
) -> TokenizeReport:
    """Every record encoded, with counts of the truncated ones and the dropped ones by
    reason, for the job's report."""
    report = TokenizeReport()
    for record in records:
        result = encode(
            record, tokenizer, cutoff_len, train_on_prompt=train_on_prompt, overlong=overlong
        )
        if isinstance(result, Refusal):
            report.dropped[result.reason] += 1
            continue
        report.examples.append(result)
        report.truncated += int(result.truncated)
    return report
