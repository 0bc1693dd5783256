"""Dataset parsing, the bad-line report and threshold, and loss-mask tokenisation."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from ftops_trainer.dataset import (
    IGNORE_INDEX,
    DatasetError,
    Record,
    load_dataset,
    parse_jsonl,
    tokenize,
)


def jsonl(*rows: Any) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def test_both_formats_parse_and_extra_keys_are_ignored() -> None:
    data = jsonl(
        {"text": "Product AB-17 costs 50 credits."},
        {"prompt": "Product AB-17 costs", "completion": " 50 credits.", "kind": "price"},
    )
    parsed = parse_jsonl(data)
    assert parsed.errors == []
    assert parsed.records == [
        Record(prompt="", completion="Product AB-17 costs 50 credits."),
        Record(prompt="Product AB-17 costs", completion=" 50 credits."),
    ]
    assert parsed.fingerprint == hashlib.sha256(data).hexdigest()


def test_every_bad_line_is_reported_with_its_line_number() -> None:
    data = (
        jsonl(
            {"text": "fine"},
            "{not json",
            "[1, 2]",
            {"question": "q", "answer": "a"},
            "",  # blank lines are ignored, but still count for numbering
            {"prompt": "", "completion": "x"},
            {"prompt": "p", "completion": 5},
            {"text": "   "},
            {"text": "t", "prompt": "p", "completion": "c"},
        )
        + b"\n\xff\xfe\n"
    )
    parsed = parse_jsonl(data)
    assert len(parsed.records) == 1
    reasons = {e.line: e.reason for e in parsed.errors}
    assert sorted(reasons) == [2, 3, 4, 6, 7, 8, 9, 10]
    assert reasons[2].startswith("invalid JSON")
    assert "JSON object" in reasons[3]
    assert "unknown format" in reasons[4]
    assert "answer, question" in reasons[4]
    assert '"prompt"' in reasons[6]
    assert '"completion"' in reasons[7]
    assert '"text"' in reasons[8]
    assert "ambiguous" in reasons[9]
    assert "UTF-8" in reasons[10]
    report = parsed.report()
    assert "line 2: invalid JSON" in report
    assert "line 10: not valid UTF-8" in report


def test_threshold_rejects_with_the_report_above_the_ratio() -> None:
    rows: list[Any] = [{"text": f"fact {i}"} for i in range(9)] + ["oops"]
    with pytest.raises(DatasetError, match=r"1 bad lines out of 10") as err:
        load_dataset(jsonl(*rows), max_bad_line_ratio=0.01)
    assert "line 10: invalid JSON" in str(err.value)


def test_threshold_skips_bad_lines_below_the_ratio() -> None:
    rows: list[Any] = [{"text": f"fact {i}"} for i in range(199)] + ["oops"]
    parsed = load_dataset(jsonl(*rows), max_bad_line_ratio=0.01)
    assert len(parsed.records) == 199
    assert [e.line for e in parsed.errors] == [200]
    assert parsed.total == 200


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_empty_dataset_is_rejected(data: bytes) -> None:
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(data, max_bad_line_ratio=1.0)


def test_all_bad_lines_is_rejected_even_with_a_lax_threshold() -> None:
    with pytest.raises(DatasetError, match="no usable line"):
        load_dataset(b"nope\n", max_bad_line_ratio=1.0)


class CharTokenizer:
    """One token per character, BOS=1 prepended like the Llama tokenizers, EOS=2."""

    eos_token_id = 2

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_loss_mask_covers_only_the_completion_and_eos() -> None:
    ex = tokenize(Record(prompt="ab", completion="cd"), CharTokenizer(), cutoff_len=64)
    assert ex is not None
    assert ex.input_ids == [1, ord("a"), ord("b"), ord("c"), ord("d"), 2]
    assert ex.labels == [IGNORE_INDEX] * 3 + [ord("c"), ord("d"), 2]


def test_text_format_trains_on_everything() -> None:
    ex = tokenize(Record(prompt="", completion="xy"), CharTokenizer(), cutoff_len=64)
    assert ex is not None
    assert ex.labels == ex.input_ids == [1, ord("x"), ord("y"), 2]


def test_truncation_at_cutoff_and_prompt_only_examples_are_dropped() -> None:
    tok = CharTokenizer()
    ex = tokenize(Record(prompt="ab", completion="cdef"), tok, cutoff_len=4)
    assert ex is not None
    assert ex.input_ids == [1, ord("a"), ord("b"), ord("c")]
    assert ex.labels == [IGNORE_INDEX] * 3 + [ord("c")]
    assert tokenize(Record(prompt="abcdef", completion="g"), tok, cutoff_len=4) is None


def test_tiny_model_tokenizer_mask_matches_joint_tokenisation(tiny_model_dir: Any) -> None:
    """Separate prompt/completion tokenisation gives the same ids as the joint string on
    the project's tokenizer, so the mask boundary sits exactly at the completion."""
    from transformers import AutoTokenizer

    import ftops_tinymodel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for fact in ftops_tinymodel.new_facts()[:10]:
        ex = tokenize(Record(**fact), tok, cutoff_len=256)
        assert ex is not None
        joint = tok(fact["prompt"] + fact["completion"])["input_ids"]
        assert ex.input_ids == [*joint, tok.eos_token_id]
        n_prompt = len(tok(fact["prompt"])["input_ids"])
        assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert all(label != IGNORE_INDEX for label in ex.labels[n_prompt:])
