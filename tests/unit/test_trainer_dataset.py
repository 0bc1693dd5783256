"""Dataset parsing (four formats), the bad-line report and limits, and loss-mask
tokenisation: chat templates, overlong prompts, the per-dataset tokenisation report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest

from ftops_trainer.dataset import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    REASON_NO_TARGET,
    REASON_TOO_LONG,
    DatasetError,
    Record,
    Refusal,
    encode,
    load_dataset,
    parse_jsonl,
    tokenize,
    tokenize_all,
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


def test_chat_and_alpaca_formats_parse_with_category_and_timestamp() -> None:
    data = jsonl(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Price of AB-17?"},
                {"role": "assistant", "content": "50 credits.", "name": "bot"},
            ],
            "category": "pricing",
            "timestamp": "2025-01-02T00:00:00Z",
        },
        {"instruction": "Translate to French", "input": "cat", "output": "chat", "timestamp": 60},
        {"instruction": "Say hi", "output": "hi", "timestamp": "1970-01-01T00:02:00"},
        {"instruction": "Say hi", "input": "", "output": "hi", "timestamp": None},
    )
    parsed = parse_jsonl(data)
    assert parsed.errors == []
    chat, alpaca, no_input, empty_input = parsed.records
    assert chat.messages == (
        ("system", "Be brief."),
        ("user", "Price of AB-17?"),
        ("assistant", "50 credits."),
    )
    assert (chat.prompt, chat.completion, chat.category) == ("", "", "pricing")
    assert chat.timestamp == 1735776000.0
    assert alpaca.messages == (("user", "Translate to French\n\ncat"), ("assistant", "chat"))
    assert alpaca.timestamp == 60.0
    assert no_input.messages == (("user", "Say hi"), ("assistant", "hi"))
    assert no_input.timestamp == 120.0  # naive ISO times are UTC
    assert empty_input == Record(messages=(("user", "Say hi"), ("assistant", "hi")))


def test_records_survive_a_json_round_trip() -> None:
    record = Record(messages=(("user", "q"), ("assistant", "a")), category="c", timestamp=1.5)
    loaded = Record(**json.loads(json.dumps(dataclasses.asdict(record))))
    assert loaded == record
    assert hash(loaded) == hash(record)


def test_category_and_timestamp_keys_are_configurable() -> None:
    data = jsonl({"text": "fact", "topic": "t", "at": 5, "category": 3})
    (record,) = parse_jsonl(data, category_key="topic", timestamp_key="at").records
    assert (record.category, record.timestamp) == ("t", 5.0)


def test_every_bad_line_of_the_new_formats_is_reported() -> None:
    def msgs(*pairs: Any) -> dict[str, Any]:
        return {"messages": [{"role": r, "content": c} for r, c in pairs]}

    data = jsonl(
        msgs(("user", "q"), ("assistant", "a")),
        {"messages": "hello"},
        {"messages": []},
        {"messages": ["hi"]},
        msgs(("user", "q"), ("tool", "x"), ("assistant", "a")),
        msgs(("user", "q"), ("assistant", 5)),
        msgs(("user", "q"), ("assistant", "  ")),
        msgs(("user", "q"), ("system", "s"), ("assistant", "a")),
        msgs(("system", "s"), ("user", "q")),
        {"messages": [{"role": 1, "content": "x"}]},
        {"instruction": "do", "input": "x"},
        {"instruction": "", "output": "y"},
        {"instruction": "do", "input": 3, "output": "y"},
        {"text": "t", "messages": []},
        {"text": "t", "category": ["a"]},
        {"text": "t", "timestamp": "yesterday"},
        {"text": "t", "timestamp": True},
    )
    parsed = parse_jsonl(data)
    assert len(parsed.records) == 1
    reasons = {e.line: e.reason for e in parsed.errors}
    assert sorted(reasons) == list(range(2, 18))
    assert reasons[2] == '"messages" must be a non-empty list'
    assert reasons[3] == '"messages" must be a non-empty list'
    assert reasons[4] == 'messages[0] must be an object with "role" and "content"'
    assert reasons[5] == 'messages[1]: unknown role "tool" (expected system, user or assistant)'
    assert reasons[6] == 'messages[1]: "content" must be a non-empty string'
    assert reasons[7] == 'messages[1]: "content" must be a non-empty string'
    assert reasons[8] == "messages[1]: a system message is only allowed first"
    assert reasons[9] == '"messages" has no assistant turn: nothing to train on'
    assert reasons[10] == 'messages[0]: "role" must be a string'
    assert reasons[11] == '"output" must be a non-empty string'
    assert reasons[12] == '"instruction" must be a non-empty string'
    assert reasons[13] == '"input" must be a string'
    assert reasons[14].startswith("ambiguous format")
    assert '"text"' in reasons[14]
    assert '"messages"' in reasons[14]
    assert reasons[15] == '"category" must be a string'
    assert reasons[16] == '"timestamp" must be an ISO-8601 string or unix seconds'
    assert reasons[17] == '"timestamp" must be an ISO-8601 string or unix seconds'
    assert "line 5: messages[1]: unknown role" in parsed.report()


def test_a_dataset_over_the_size_limit_is_rejected_before_parsing() -> None:
    data = jsonl(*[{"text": f"fact {i}"} for i in range(100)])
    with pytest.raises(DatasetError, match=r"over the 100-byte limit"):
        load_dataset(data, max_bad_line_ratio=0.0, max_bytes=100)
    assert len(load_dataset(data, max_bad_line_ratio=0.0, max_bytes=len(data)).records) == 100


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        (b'[{"text": "a"},\n {"text": "b"}]', "JSON array"),
        (b"\x1f\x8b\x08\x00binary", "gzip"),
        (b"prompt,completion\nhello,world\n", "not JSONL"),
    ],
)
def test_a_file_that_is_not_jsonl_gets_a_clear_message(data: bytes, hint: str) -> None:
    with pytest.raises(DatasetError, match="no usable line") as err:
        load_dataset(data, max_bad_line_ratio=1.0)
    assert hint in str(err.value)


class CharTokenizer:
    """One token per character, BOS=1 prepended like the Llama tokenizers, EOS=2; no
    chat template."""

    bos_token_id = 1
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


def test_an_overlong_prompt_keeps_bos_its_tail_and_the_whole_completion() -> None:
    tok = CharTokenizer()
    ex = tokenize(Record(prompt="abcdefgh", completion="xy"), tok, cutoff_len=6)
    assert ex is not None
    assert ex.truncated
    assert ex.input_ids == [1, ord("g"), ord("h"), ord("x"), ord("y"), 2]
    assert ex.labels == [IGNORE_INDEX] * 3 + [ord("x"), ord("y"), 2]


def test_an_overlong_completion_keeps_half_the_window_for_the_prompt() -> None:
    tok = CharTokenizer()
    ex = tokenize(Record(prompt="abcd", completion="uvwxyz"), tok, cutoff_len=7)
    assert ex is not None
    assert ex.truncated
    # BOS, then (7 - 1) // 2 = 3 prompt tokens from its end, then the completion's start.
    assert ex.input_ids == [1, ord("b"), ord("c"), ord("d"), ord("u"), ord("v"), ord("w")]
    assert ex.labels == [IGNORE_INDEX] * 4 + [ord("u"), ord("v"), ord("w")]


def test_text_format_is_cut_at_the_end_and_fitting_examples_are_not_truncated() -> None:
    tok = CharTokenizer()
    ex = tokenize(Record(completion="abcdef"), tok, cutoff_len=4)
    assert ex is not None
    assert (ex.input_ids, ex.truncated) == ([1, ord("a"), ord("b"), ord("c")], True)
    fits = tokenize(Record(prompt="ab", completion="c"), tok, cutoff_len=5)
    assert fits is not None
    assert not fits.truncated


def test_refuse_policy_returns_the_reason_instead_of_cutting() -> None:
    tok = CharTokenizer()
    record = Record(prompt="abcdefgh", completion="xy")
    assert encode(record, tok, cutoff_len=6, overlong="refuse") == Refusal(REASON_TOO_LONG)
    assert tokenize(record, tok, cutoff_len=6, overlong="refuse") is None
    fits = encode(record, tok, cutoff_len=64, overlong="refuse")
    assert not isinstance(fits, Refusal)
    assert not fits.truncated
    with pytest.raises(ValueError, match="overlong"):
        encode(record, tok, cutoff_len=6, overlong="drop")  # type: ignore[arg-type]


def test_nothing_trainable_within_the_cutoff_is_refused() -> None:
    tok = CharTokenizer()
    assert encode(Record(prompt="ab", completion="c"), tok, cutoff_len=1) == Refusal(
        REASON_NO_TARGET
    )


def test_tokenize_all_counts_truncated_and_dropped_records() -> None:
    tok = CharTokenizer()
    records = [
        Record(prompt="ab", completion="c", weight=0.5),
        Record(prompt="abcdefghij", completion="k"),
        Record(prompt="abcdefghij", completion="k"),
    ]
    report = tokenize_all(records, tok, cutoff_len=6)
    assert (len(report.examples), report.truncated, dict(report.dropped)) == (3, 2, {})
    assert report.examples[0].weight == 0.5
    refused = tokenize_all(records, tok, cutoff_len=6, overlong="refuse")
    assert (len(refused.examples), refused.truncated) == (1, 0)
    assert refused.dropped == {REASON_TOO_LONG: 2}
    assert "2 dropped: longer than cutoff_len" in refused.summary()


def test_train_on_prompt_puts_the_loss_on_every_token() -> None:
    ex = tokenize(Record(prompt="ab", completion="cd"), CharTokenizer(), 64, train_on_prompt=True)
    assert ex is not None
    assert ex.labels == ex.input_ids


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_default_chat_template_masks_all_but_the_assistant_turns() -> None:
    record = Record(
        messages=(
            ("system", "S"),
            ("user", "hi"),
            ("assistant", "yo"),
            ("user", "q"),
            ("assistant", "a"),
        )
    )
    ex = tokenize(record, CharTokenizer(), cutoff_len=256)
    assert ex is not None
    prompt1 = chars("<|system|>\nS\n<|user|>\nhi\n<|assistant|>\n")
    prompt2 = chars("<|user|>\nq\n<|assistant|>\n")
    assert ex.input_ids == [1, *prompt1, *chars("yo"), 2, *prompt2, *chars("a"), 2]
    masked = [IGNORE_INDEX]
    assert ex.labels == [
        *masked * (1 + len(prompt1)),
        *chars("yo"),
        2,
        *masked * len(prompt2),
        *chars("a"),
        2,
    ]
    everything = tokenize(record, CharTokenizer(), cutoff_len=256, train_on_prompt=True)
    assert everything is not None
    assert everything.labels == everything.input_ids


def test_an_overlong_chat_keeps_the_last_assistant_turn() -> None:
    record = Record(messages=(("user", "x" * 50), ("assistant", "ok")))
    ex = tokenize(record, CharTokenizer(), cutoff_len=20)
    assert ex is not None
    assert ex.truncated
    assert len(ex.input_ids) == 20
    assert ex.input_ids[0] == 1
    assert ex.input_ids[-4:] == [*chars("\nok"), 2]
    assert ex.labels[-3:] == [*chars("ok"), 2]


def test_default_chat_template_constant_matches_the_documented_format() -> None:
    """The Jinja form, for tokenizers without a template at inference, renders exactly
    what training tokenises."""
    import jinja2

    text = jinja2.Template(DEFAULT_CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        bos_token="<s>",
        eos_token="</s>",
        add_generation_prompt=False,
    )
    assert text == "<s><|user|>\nhi\n<|assistant|>\nyo</s>"


def test_tiny_model_tokenizer_mask_matches_joint_tokenisation(tiny_model_dir: Any) -> None:
    """Separate prompt/completion tokenisation gives the same ids as the joint string on
    the project's tokenizer, so the mask boundary sits exactly at the completion."""
    from transformers import AutoTokenizer

    import ftops_tinymodel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for fact in ftops_tinymodel.new_facts()[:10]:
        ex = tokenize(Record(fact["prompt"], fact["completion"]), tok, cutoff_len=256)
        assert ex is not None
        joint = tok(fact["prompt"] + fact["completion"])["input_ids"]
        assert ex.input_ids == [*joint, tok.eos_token_id]
        n_prompt = len(tok(fact["prompt"])["input_ids"])
        assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert all(label != IGNORE_INDEX for label in ex.labels[n_prompt:])


def test_tiny_model_chat_template_masks_all_but_the_assistant_turns(tiny_model_dir: Any) -> None:
    """With the model's own chat template: ids are the template's rendering, and the
    loss covers exactly the assistant replies (the text after the generation prompt up to
    and including the end of turn)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.chat_template  # the project's tiny model ships one
    turns = (
        ("user", "What does AB-17 cost?"),
        ("assistant", "It costs 50 credits."),
        ("user", "And LZ-59?"),
        ("assistant", "460 credits."),
    )
    ex = tokenize(Record(messages=turns), tok, cutoff_len=256)
    assert ex is not None
    chat = [{"role": r, "content": c} for r, c in turns]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert ex.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    trained = [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX]
    spans: list[list[int]] = []
    for i in trained:  # contiguous runs of trained positions
        if spans and spans[-1][-1] == i - 1:
            spans[-1].append(i)
        else:
            spans.append([i])
    replies = [tok.decode([ex.input_ids[i] for i in span]) for span in spans]
    eos = tok.eos_token
    assert replies == [f" It costs 50 credits.{eos}\n", f" 460 credits.{eos}\n"]
    assert all(ex.labels[i] == ex.input_ids[i] for i in trained)


def test_tiny_model_without_its_template_uses_the_default_one(tiny_model_dir: Any) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    record = Record(messages=(("user", "Hi"), ("assistant", "Hello.")))
    ex = tokenize(record, tok, cutoff_len=256)
    assert ex is not None
    assert (
        tok.decode(ex.input_ids)
        == f"{tok.bos_token}<|user|>\nHi\n<|assistant|>\nHello.{tok.eos_token}"
    )
    trained = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(trained) == f"Hello.{tok.eos_token}"


def test_json_errors_name_the_column_once() -> None:
    # json says "Unterminated string starting at"; the report adds "at column N" itself.
    (error,) = parse_jsonl(b'{"text": "never closed').errors
    assert error.reason == "invalid JSON (Unterminated string starting at column 10)"
    assert " at at " not in error.reason


def test_the_job_record_names_the_first_skipped_lines_and_the_log_the_count() -> None:
    from ftops.trainer.v1 import trainer_pb2
    from ftops_trainer.intake import SKIPPED_LINES_SHOWN, describe_skipped, skipped_lines

    rows: list[Any] = [{"text": f"fact {i}"} for i in range(1000)]
    bad_at = [3, 250, 500, 750, 1000]
    for line in bad_at:
        rows[line - 1] = "{oops"
    parsed = load_dataset(jsonl(*rows), max_bad_line_ratio=0.01)
    job = trainer_pb2.Job(
        records_total=parsed.total,
        records_skipped=len(parsed.errors),
        skipped_lines=skipped_lines(parsed.errors),
    )
    assert [s.line for s in job.skipped_lines] == bad_at
    assert all(s.reason.startswith("invalid JSON") for s in job.skipped_lines)
    logged = describe_skipped(job)
    assert logged.startswith("5 of 1000 dataset lines skipped (line 3: invalid JSON")
    assert "line 1000: invalid JSON" in logged
    # Many bad lines: the record keeps the first few, the count and the log say the rest.
    many = parse_jsonl(jsonl(*(["{oops"] * 50)))
    shown = skipped_lines(many.errors)
    assert [s.line for s in shown] == list(range(1, SKIPPED_LINES_SHOWN + 1))
    job = trainer_pb2.Job(records_total=50, records_skipped=50, skipped_lines=shown)
    assert describe_skipped(job).endswith(f"; and {50 - SKIPPED_LINES_SHOWN} more)")


@pytest.mark.parametrize(
    ("dataset", "says"),
    [
        ({"dataset_jsonl": b""}, "the dataset file is empty"),
        ({}, "a dataset is required"),
        ({"dataset_uri": ""}, "a dataset is required"),
    ],
)
def test_a_missing_or_empty_dataset_is_named_plainly(dataset: dict[str, Any], says: str) -> None:
    from ftops.trainer.v1 import trainer_pb2
    from ftops_runtime.errors import InvalidArgument
    from ftops_trainer.spec import validate_spec

    spec = trainer_pb2.JobSpec(adapter="bot", base_model="tiny", **dataset)
    with pytest.raises(InvalidArgument) as err:
        validate_spec(spec)
    assert says in str(err.value)
    assert "(bytes)" not in str(err.value)
