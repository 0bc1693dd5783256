"""The replay reservoir: bounded, deterministic, uniform, stored as checked JSONL; the
replay mix; and the holdout split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ftops_trainer.dataset import Record
from ftops_trainer.gate import split_holdout
from ftops_trainer.replay import (
    REPLAY_FILES,
    REPLAY_HEADER,
    REPLAY_RECORDS,
    ReplayBuffer,
    ReplayBufferError,
    lineage_buffer,
    mix_replay,
    replay_count,
)


def recs(n: int, tag: str = "r") -> list[Record]:
    return [Record(prompt=f"{tag}{i} is", completion=f" {i}.") for i in range(n)]


def test_reservoir_is_bounded_and_deterministic() -> None:
    a, b = ReplayBuffer(capacity=50, seed=7), ReplayBuffer(capacity=50, seed=7)
    a.add(recs(1000))
    for start in range(0, 1000, 137):  # the batch boundaries do not matter
        b.add(recs(1000)[start : start + 137])
    assert len(a) == 50
    assert a.seen == 1000
    assert a.records == b.records
    other = ReplayBuffer(capacity=50, seed=8)
    other.add(recs(1000))
    assert other.records != a.records


def test_reservoir_keeps_everything_until_full() -> None:
    buffer = ReplayBuffer(capacity=10)
    buffer.add(recs(7))
    assert buffer.records == recs(7)


def test_reservoir_is_roughly_uniform() -> None:
    # 400 buffers of 20 from a stream of 100: each item kept ~80 times (binomial sd ~8).
    counts: Counter[int] = Counter()
    stream = recs(100)
    for seed in range(400):
        buffer = ReplayBuffer(capacity=20, seed=seed)
        buffer.add(stream)
        counts.update(int(r.prompt[1:].split()[0]) for r in buffer.records)
    assert sum(counts.values()) == 400 * 20
    assert min(counts[i] for i in range(100)) > 45
    assert max(counts.values()) < 120
    early = sum(counts[i] for i in range(50))
    assert abs(early - 4000) < 300  # no bias towards the start or the end of the stream


def test_save_load_round_trip_continues_identically(tmp_path: Path) -> None:
    odd = Record(prompt='Ünïcode "quoted"\n', completion=" ok\t✓")
    chat = Record(messages=(("user", "hi"), ("assistant", "hello")), weight=2.5, timestamp=1.0)
    buffer = ReplayBuffer(capacity=30, seed=3)
    buffer.add([odd, chat, *recs(60)])
    buffer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPLAY_FILES)
    header = json.loads((tmp_path / REPLAY_HEADER).read_text())
    assert header["capacity"] == 30
    assert header["seen"] == 62
    assert header["count"] == 30
    loaded = ReplayBuffer.load(tmp_path)
    assert loaded.records == buffer.records
    assert (loaded.capacity, loaded.seed, loaded.seen) == (30, 3, 62)
    kept = ReplayBuffer(capacity=5)
    kept.add([odd, chat])
    kept.save(tmp_path / "kept")
    assert ReplayBuffer.load(tmp_path / "kept").records == [odd, chat]  # every field back
    # Later additions stay deterministic across the save/load boundary.
    buffer.add(recs(40, "x"))
    loaded.add(recs(40, "x"))
    assert loaded.records == buffer.records


def _corrupt(directory: Path, body: str) -> None:
    """Replace the records and fix the header's hash, so only the content is wrong."""
    import hashlib

    (directory / REPLAY_RECORDS).write_text(body)
    header = json.loads((directory / REPLAY_HEADER).read_text())
    header["records_sha256"] = hashlib.sha256(body.encode()).hexdigest()
    header["count"] = len(body.splitlines())
    (directory / REPLAY_HEADER).write_text(json.dumps(header))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    buffer = ReplayBuffer(capacity=10)
    buffer.add(recs(5))
    buffer.save(tmp_path)
    return tmp_path


def test_load_refuses_tampered_records(saved: Path) -> None:
    with (saved / REPLAY_RECORDS).open("a") as f:
        f.write('{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(ReplayBufferError, match="sha256 does not match"):
        ReplayBuffer.load(saved)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('{"prompt": "p", "completion": "c"}\nnot json\n', "line 2: Expecting value"),
        ('["a", "b"]\n', "line 1: expected a JSON object"),
        ('{"prompt": "p"}\n', 'line 1: "completion" must be a string'),
        ('{"prompt": "", "completion": "", "messages": [["user"]]}\n', '"messages" must be'),
    ],
)
def test_load_refuses_malformed_lines(saved: Path, body: str, match: str) -> None:
    _corrupt(saved, body)
    with pytest.raises(ReplayBufferError, match=match):
        ReplayBuffer.load(saved)


def test_load_refuses_bad_header_and_missing_files(saved: Path) -> None:
    header = json.loads((saved / REPLAY_HEADER).read_text())
    (saved / REPLAY_HEADER).write_text(json.dumps({**header, "seen": -1}))
    with pytest.raises(ReplayBufferError, match='"seen" must be a non-negative integer'):
        ReplayBuffer.load(saved)
    (saved / REPLAY_HEADER).write_text(json.dumps({**header, "seen": 2}))  # < 5 records
    with pytest.raises(ReplayBufferError, match="inconsistent buffer"):
        ReplayBuffer.load(saved)
    (saved / REPLAY_HEADER).write_text("{oops")
    with pytest.raises(ReplayBufferError, match="not valid JSON"):
        ReplayBuffer.load(saved)
    (saved / REPLAY_HEADER).write_text(json.dumps({**header, "format": "pickle"}))
    with pytest.raises(ReplayBufferError, match="not an ftops replay buffer"):
        ReplayBuffer.load(saved)
    (saved / REPLAY_RECORDS).unlink()
    with pytest.raises(ReplayBufferError, match="missing"):
        ReplayBuffer.load(saved)


def test_lineage_buffer_takes_the_parent_s_or_seeds_a_new_one(tmp_path: Path) -> None:
    fresh = lineage_buffer(None, recs(3, "probe"), capacity=100)
    assert fresh.records == recs(3, "probe")
    fresh.add(recs(4))
    fresh.save(tmp_path)
    child = lineage_buffer(tmp_path, recs(3, "probe"), capacity=100)
    assert child.records == recs(3, "probe") + recs(4)  # the parent's, not re-seeded
    assert lineage_buffer(tmp_path / "absent", [], capacity=100).records == []


@pytest.mark.parametrize(("n_new", "ratio"), [(90, 0.1), (100, 0.5), (30, 0.25), (7, 0.3)])
def test_mix_ratio_is_exact(n_new: int, ratio: float) -> None:
    buffer = ReplayBuffer(capacity=1000)
    buffer.add(recs(500, "old"))
    mixed = mix_replay(recs(n_new), buffer, ratio, seed=1)
    n_replay = len(mixed) - n_new
    assert mixed[:n_new] == recs(n_new)
    assert n_replay == replay_count(n_new, ratio)
    assert abs(n_replay / len(mixed) - ratio) <= 0.5 / len(mixed) + 1e-9
    assert len(set(mixed[n_new:])) == n_replay  # without replacement while it fits
    assert mix_replay(recs(n_new), buffer, ratio, seed=1) == mixed


def test_mix_edge_cases() -> None:
    buffer = ReplayBuffer(capacity=10)
    assert mix_replay(recs(5), buffer, 0.5) == recs(5)  # empty buffer: nothing to replay
    buffer.add(recs(2, "old"))
    assert mix_replay(recs(5), buffer, 0.0) == recs(5)
    upsampled = mix_replay(recs(6), buffer, 0.5)  # 6 wanted from 2: whole passes repeated
    assert Counter(upsampled[6:]) == {r: 3 for r in recs(2, "old")}
    with pytest.raises(ValueError, match="ratio"):
        mix_replay(recs(5), buffer, 1.0)


def test_holdout_split_is_deterministic_and_disjoint() -> None:
    records = recs(95)
    split = split_holdout(records, 0.1, seed=4)
    assert split == split_holdout(records, 0.1, seed=4)
    assert split != split_holdout(records, 0.1, seed=5)
    assert not split.holdout_is_training
    assert len(split.holdout) == 10  # round(0.1 * 95)
    assert sorted(split.train + split.holdout, key=records.index) == records
    assert [records.index(r) for r in split.train] == sorted(records.index(r) for r in split.train)
    assert len(split_holdout(records, 0.01, min_holdout=3).holdout) == 3


def test_holdout_of_a_tiny_dataset_is_the_training_set() -> None:
    split = split_holdout(recs(9), 0.1)
    assert split.holdout_is_training
    assert split.train == split.holdout == recs(9)
    assert len(split_holdout(recs(10), 0.1).holdout) == 1
