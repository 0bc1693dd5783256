"""A general-knowledge probe set for base models that ship no ``ftops_retention.jsonl``.

``data/general_knowledge.jsonl`` holds a few hundred short questions with their answers
(capitals, arithmetic, common facts), written for this project. A base model keeps only the
ones it answers right: each question is asked once, greedily, the way the gate asks (a
chat with one user turn where the tokenizer has a chat template, else ``Question: ...
Answer:``), and an answer counts when its first line names the expected answer (or an
accepted alias) as a whole word, case-insensitively. The probe record kept is the question
with the model's *own* answer cut right after that name ("The capital of France is
Paris"), so the gate's greedy exact match (the answer starts with the record's completion)
scores the base model at 1.0 on it and a version that still answers the same way at 1.0.

The kept records are computed once per base model, when the trainer first uses it, and
stored in the model cache keyed by the model's fingerprint (``probes/<fingerprint>.jsonl``
with a summary beside it); a model that answers none keeps none, and the gate then says
retention was not checked rather than pretending.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ftops_trainer.dataset import Record, generation_prefix, parse_jsonl

log = logging.getLogger(__name__)

# Bump when the probe set, the prompt format or the filtering changes: cached filters of
# another version are not reused.
PROBE_SET_VERSION = "1"
PROBE_SET_FILE = "general_knowledge.jsonl"
MAX_ANSWER_TOKENS = 24
BATCH_SIZE = 16

# Answers texts for a batch of prompt token ids (greedy).
AnswerFn = Callable[[Sequence[list[int]]], list[str]]


@dataclass(frozen=True)
class Probe:
    question: str
    answer: str
    accept: tuple[str, ...] = ()
    kind: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return (self.answer, *self.accept)


@dataclass
class FilterResult:
    records: list[Record]
    total: int
    kept_by_kind: dict[str, int] = field(default_factory=dict)
    total_by_kind: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "version": PROBE_SET_VERSION,
            "kept": len(self.records),
            "total": self.total,
            "kept_by_kind": self.kept_by_kind,
            "total_by_kind": self.total_by_kind,
            "seconds": round(self.seconds, 2),
        }


def load_probe_set() -> list[Probe]:
    text = resources.files("ftops_trainer").joinpath("data", PROBE_SET_FILE).read_text("utf-8")
    probes = []
    for line in text.splitlines():
        if line.strip():
            item = json.loads(line)
            probes.append(
                Probe(
                    item["question"],
                    item["answer"],
                    tuple(item.get("accept", ())),
                    item.get("kind", ""),
                )
            )
    return probes


def answer_end(text: str, probe: Probe) -> int | None:
    """Where the first mention of the expected answer (or an alias) ends in the answer's
    first line, as a whole word and case-insensitively; None when it is not there."""
    line = text.strip().split("\n", 1)[0]
    ends = [
        m.end()
        for name in probe.names
        if (m := re.search(rf"(?<!\w){re.escape(name)}(?!\w)", line, re.IGNORECASE))
    ]
    return min(ends) if ends else None


def probe_record(question: str, answer: str, *, chat: bool) -> Record:
    """The probe as the gate asks it: a one-turn chat, or a question/answer prompt."""
    if chat:
        return Record(messages=(("user", question), ("assistant", answer)))
    return Record(prompt=f"Question: {question}\nAnswer:", completion=f" {answer}")


def filter_probes(
    answer: AnswerFn,
    tokenizer: Any,
    probes: Sequence[Probe],
    *,
    batch_size: int = BATCH_SIZE,
) -> FilterResult:
    """The probes the model answers right (``answer`` gives its greedy texts), as records
    whose completion is its own answer up to the expected name."""
    started = time.monotonic()
    chat = bool(getattr(tokenizer, "chat_template", None))
    asked: list[tuple[Probe, list[int]]] = []
    for probe in probes:
        prefix = generation_prefix(probe_record(probe.question, "x", chat=chat), tokenizer)
        if prefix is not None:
            asked.append((probe, prefix[0]))
    result = FilterResult(records=[], total=len(probes))
    for probe in probes:
        result.total_by_kind[probe.kind] = result.total_by_kind.get(probe.kind, 0) + 1
    for start in range(0, len(asked), batch_size):
        batch = asked[start : start + batch_size]
        texts = answer([ids for _, ids in batch])
        for (probe, _), text in zip(batch, texts, strict=True):
            end = answer_end(text, probe)
            if end is None:
                continue
            first_line = text.strip().split("\n", 1)[0]
            kept = first_line[:end].strip()
            result.records.append(probe_record(probe.question, kept, chat=chat))
            result.kept_by_kind[probe.kind] = result.kept_by_kind.get(probe.kind, 0) + 1
    result.seconds = time.monotonic() - started
    return result


def greedy_answers(model: Any, tokenizer: Any, max_new_tokens: int = MAX_ANSWER_TOKENS) -> AnswerFn:
    """The model's greedy continuations of a batch of prompts (left padded, as the gate's
    exact match generates them)."""

    def answer(prompts: Sequence[list[int]]) -> list[str]:
        import torch

        pad = tokenizer.pad_token_id
        pad_id = int(tokenizer.eos_token_id if pad is None else pad)
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        return list(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))

    return answer


def _cache_paths(fingerprint: str, cache_dir: Path | None) -> tuple[Path, Path]:
    from ftops_models import model_cache_dir

    folder = (cache_dir or model_cache_dir()) / "probes"
    stem = f"{fingerprint[:40]}-v{PROBE_SET_VERSION}"
    return folder / f"{stem}.jsonl", folder / f"{stem}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def cached_summary(fingerprint: str, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """What the base model kept, once filtered: kept/total, by kind, seconds."""
    _, summary = _cache_paths(fingerprint, cache_dir)
    try:
        data: dict[str, Any] = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    return data


def general_probes(
    base_dir: Path, fingerprint: str, *, cache_dir: Path | None = None
) -> list[Record]:
    """The probe set filtered by the base model at ``base_dir``: read from the model cache
    when this fingerprint was filtered before, else computed (the model answers every
    question once) and stored there."""
    records_path, summary_path = _cache_paths(fingerprint, cache_dir)
    if records_path.is_file() and summary_path.is_file():
        parsed = parse_jsonl(records_path.read_bytes())
        if not parsed.errors:
            return parsed.records
        log.warning("cached probes %s are unreadable: filtering again", records_path)
    from ftops_trainer.evaluation import load_model

    model, tokenizer = load_model(Path(base_dir))
    result = filter_probes(greedy_answers(model, tokenizer), tokenizer, load_probe_set())
    lines = [json.dumps(_record_json(r), ensure_ascii=False) for r in result.records]
    _write_atomic(records_path, "".join(f"{line}\n" for line in lines).encode())
    summary = {**result.summary(), "base_dir": str(base_dir), "fingerprint": fingerprint}
    _write_atomic(summary_path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    log.info(
        "general-knowledge probes for %s: the base model answers %d of %d (%.1fs)",
        base_dir,
        len(result.records),
        result.total,
        result.seconds,
    )
    return result.records


def _record_json(record: Record) -> dict[str, Any]:
    if record.messages:
        return {"messages": [{"role": r, "content": c} for r, c in record.messages]}
    return {"prompt": record.prompt, "completion": record.completion}
