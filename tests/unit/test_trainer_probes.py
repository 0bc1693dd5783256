"""The general-knowledge probe set: a few hundred questions shipped with the trainer, each
base model keeping the ones it answers right (its own answer, cut after the expected
name), filtered once and cached by fingerprint; the trainer uses them when the model
directory has no ftops_retention.jsonl. On the tiny model, which knows no capital, the
filter keeps what it keeps (none or few) and says so."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from ftops.trainer.v1 import trainer_pb2
from ftops_trainer import probes as probes_module
from ftops_trainer.dataset import Record, generation_prefix
from ftops_trainer.probes import (
    Probe,
    answer_end,
    cached_summary,
    filter_probes,
    general_probes,
    load_probe_set,
    probe_record,
)
from ftops_trainer.runner import RETENTION_PROBE_FILE, JobRunner


def test_the_shipped_set_has_a_few_hundred_distinct_questions() -> None:
    probes = load_probe_set()
    assert len(probes) >= 300
    assert len({p.question for p in probes}) == len(probes)
    assert {p.kind for p in probes} == {"capital", "arithmetic", "fact"}
    assert all(p.question.endswith("?") and p.answer for p in probes)


def test_an_answer_counts_when_its_first_line_names_the_answer_as_a_word() -> None:
    paris = Probe("What is the capital of France?", "Paris")
    text = "The capital of France is Paris. It is also its largest city."
    assert text[: answer_end(text, paris)] == "The capital of France is Paris"
    assert answer_end("PARIS", paris) == 5
    assert answer_end("Parisian food is great.", paris) is None
    assert answer_end("I do not know.\nParis", paris) is None  # not in the first line
    eight = Probe("How many legs does a spider have?", "8", ("eight",))
    assert answer_end("A spider has eight legs.", eight) == len("A spider has eight")
    assert answer_end("A spider has 18 legs.", eight) is None
    # The earliest mention of any accepted name ends the kept answer.
    assert answer_end("Eight, or 8.", eight) == len("Eight")


class _Scripted:
    """A stand-in model: answers the questions it knows, in order, by prompt."""

    def __init__(self) -> None:
        self.by_prompt: dict[tuple[int, ...], str] = {}
        self.calls = 0

    def __call__(self, prompts: Sequence[list[int]]) -> list[str]:
        self.calls += 1
        return [self.by_prompt.get(tuple(p), "I am not sure.") for p in prompts]


def test_only_questions_answered_right_are_kept_with_the_models_own_words(
    tiny_model_dir: Path,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    probes = [
        Probe("What is the capital of France?", "Paris", kind="capital"),
        Probe("What is 2 plus 2?", "4", ("four",), kind="arithmetic"),
        Probe("What color is grass?", "green", kind="fact"),
    ]
    model = _Scripted()
    chat = bool(getattr(tokenizer, "chat_template", None))
    said = {
        "What is the capital of France?": "The capital of France is Paris. Next question",
        "What is 2 plus 2?": "2 plus 2 is five.",
        "What color is grass?": " Green\nand more",
    }
    for question, text in said.items():
        prefix = generation_prefix(probe_record(question, "x", chat=chat), tokenizer)
        assert prefix is not None
        model.by_prompt[tuple(prefix[0])] = text
    result = filter_probes(model, tokenizer, probes, batch_size=2)
    assert model.calls == 2
    assert result.records == [
        probe_record("What is the capital of France?", "The capital of France is Paris", chat=chat),
        probe_record("What color is grass?", "Green", chat=chat),
    ]
    assert result.summary()["kept"] == 2
    assert result.kept_by_kind == {"capital": 1, "fact": 1}
    assert result.total_by_kind == {"capital": 1, "arithmetic": 1, "fact": 1}


def test_the_tiny_model_keeps_what_it_answers_and_the_filter_is_cached_by_fingerprint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftops_trainer.evaluation import evaluate

    shipped = load_probe_set()
    monkeypatch.setattr(probes_module, "load_probe_set", lambda: shipped[:48])
    kept = general_probes(tiny_model_dir, "f" * 64, cache_dir=tmp_path)
    summary = cached_summary("f" * 64, cache_dir=tmp_path)
    assert summary is not None
    assert (summary["kept"], summary["total"]) == (len(kept), 48)
    assert summary["fingerprint"] == "f" * 64
    # The tiny model was trained on facts about a made-up world: it keeps few or none of
    # these, and every probe it keeps it answers exactly as recorded.
    assert len(kept) < 48
    if kept:
        assert evaluate(tiny_model_dir, kept).exact_match == 1.0

    # Read back from the cache: the model is not asked again.
    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("the filter ran again")

    monkeypatch.setattr("ftops_trainer.evaluation.load_model", no_model)
    assert general_probes(tiny_model_dir, "f" * 64, cache_dir=tmp_path) == kept
    assert cached_summary("0" * 64, cache_dir=tmp_path) is None


def test_the_trainer_uses_them_only_when_the_model_ships_no_probe_file(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[Path, str]] = []
    general = [probe_record("What is the capital of France?", "Paris", chat=False)]

    def fake_general(base_dir: Path, fingerprint: str) -> list[Record]:
        asked.append((base_dir, fingerprint))
        return general

    monkeypatch.setattr(probes_module, "general_probes", fake_general)
    spec = trainer_pb2.JobSpec()
    # The tiny model ships its own probe file: that is what it is measured on.
    own = JobRunner._probes(tiny_model_dir, spec, "abc")
    assert own
    assert general[0] not in own
    assert asked == []
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / RETENTION_PROBE_FILE).unlink()
    assert JobRunner._probes(bare, spec, "abc") == general
    assert asked == [(bare, "abc")]
    assert JobRunner._probes(bare, spec, "abc", general=False) == []
    extra = json.dumps({"prompt": "Q", "completion": "A"}).encode()
    spec.gate.retention_jsonl = extra
    assert JobRunner._probes(bare, spec, "abc") == [*general, Record(prompt="Q", completion="A")]


def test_chat_probes_are_split_between_replay_and_retention_by_content() -> None:
    from ftops_trainer.runner import probe_split

    chats = [
        probe_record(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}", chat=True)
        for i in range(40)
    ]
    replay, held = probe_split(chats)
    # Chats have no prompt/completion: split on their turns, not all on one side.
    assert 10 <= len(held) <= 30
    assert sorted(map(str, replay + held)) == sorted(map(str, chats))
    assert probe_split(chats) == (replay, held)
    pairs = [probe_record(f"Q{i}?", f"A{i}", chat=False) for i in range(40)]
    assert 10 <= len(probe_split(pairs)[1]) <= 30
