"""Replay against forgetting: a bounded, seeded reservoir of a lineage's earlier records.

Each job in an adapter lineage trains on its new records plus a share of records replayed
from this buffer, then stores ``parent's buffer + its own new records`` next to its adapter
(a registry artifact), so the next job's buffer covers the whole lineage. The first job
seeds it with the base model's retention probes (its "own knowledge").

Storage is two plain files, never a pickle: a small JSON header (format, capacity, seen
count, seed, record count and the records file's sha256) and the records as JSONL. The
reservoir's randomness is counter-based (a hash of seed and stream position), so seed and
seen count are the whole RNG state and a reloaded buffer continues exactly where it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ftops_runtime.errors import DataLoss
from ftops_trainer.dataset import Record

REPLAY_HEADER = "replay_buffer.json"
REPLAY_RECORDS = "replay_buffer.jsonl"
REPLAY_FILES = (REPLAY_HEADER, REPLAY_RECORDS)
FORMAT = "ftops.replay_buffer"
FORMAT_VERSION = 1
DEFAULT_CAPACITY = 2000
# Share of replayed records in a job's training set: the 0.1, a common choice for
# large datasets. bench/forgetting.py shows 0.1 barely helps on small fact sets; 0.5-0.8
# does (at 2-5x the training steps).
DEFAULT_REPLAY_RATIO = 0.1


class ReplayBufferError(DataLoss):
    """A stored buffer is missing, corrupt or malformed; the message says which file/line."""


def _slot(seed: int, position: int) -> int:
    """A uniform-enough 64-bit draw for stream position ``position`` (Algorithm R's j)."""
    digest = hashlib.sha256(f"ftops-replay:{seed}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _record_to_json(record: Record) -> str:
    return json.dumps(dataclasses.asdict(record), ensure_ascii=False, sort_keys=True)


def _record_from_json(obj: Any) -> Record:
    """A Record from a decoded JSON line; raises ValueError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f'"{key}" must be a string')
    turns = obj.get("messages", [])
    if not isinstance(turns, list) or not all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in turns
    ):
        raise ValueError('"messages" must be a list of [role, content] string pairs')
    known = {f.name for f in dataclasses.fields(Record)}
    # Fields a newer trainer added and this one does not know are dropped, not fatal.
    try:
        return Record(**{k: v for k, v in obj.items() if k in known})
    except TypeError as exc:
        raise ValueError(str(exc)) from exc


class ReplayBuffer:
    """Algorithm R reservoir: after ``seen`` records streamed through ``add``, every one
    of them is held with probability ``capacity / seen`` (all of them while seen <= capacity).
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        seed: int = 0,
        *,
        records: Sequence[Record] = (),
        seen: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if len(records) > capacity or seen < len(records):
            raise ValueError(f"inconsistent buffer: {len(records)} records, seen={seen}")
        if len(records) < capacity and seen != len(records):
            raise ValueError(f"inconsistent buffer: not full ({len(records)}) yet seen={seen}")
        self.capacity = capacity
        self.seed = seed
        self.seen = seen
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> list[Record]:
        return list(self._records)

    def add(self, records: Iterable[Record]) -> None:
        for record in records:
            if self.seen < self.capacity:
                self._records.append(record)
            else:
                j = _slot(self.seed, self.seen) % (self.seen + 1)
                if j < self.capacity:
                    self._records[j] = record
            self.seen += 1

    def sample(self, n: int, seed: int) -> list[Record]:
        """``n`` records, deterministic in ``seed``: without replacement while ``n`` fits in
        the buffer, otherwise whole shuffled passes repeated (replay upsampled)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []
        if not self._records:
            raise ValueError("cannot sample from an empty replay buffer")
        rng = random.Random(seed)
        out: list[Record] = []
        while len(out) < n:
            order = list(range(len(self._records)))
            rng.shuffle(order)
            out += [self._records[i] for i in order[: n - len(out)]]
        return out

    def save(self, directory: Path) -> None:
        """Write the records then the header (which names the records' hash), each
        atomically, so a crash never leaves a header describing other records."""
        directory.mkdir(parents=True, exist_ok=True)
        body = "".join(_record_to_json(r) + "\n" for r in self._records).encode()
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "capacity": self.capacity,
            "seed": self.seed,
            "seen": self.seen,
            "count": len(self._records),
            "records_sha256": hashlib.sha256(body).hexdigest(),
        }
        _write_atomic(directory / REPLAY_RECORDS, body)
        _write_atomic(directory / REPLAY_HEADER, (json.dumps(header, indent=2) + "\n").encode())

    @staticmethod
    def exists(directory: Path) -> bool:
        return all((directory / name).is_file() for name in REPLAY_FILES)

    @classmethod
    def load(cls, directory: Path) -> ReplayBuffer:
        header_path, records_path = directory / REPLAY_HEADER, directory / REPLAY_RECORDS
        try:
            header = json.loads(header_path.read_text(encoding="utf-8"))
            body = records_path.read_bytes()
        except FileNotFoundError as exc:
            raise ReplayBufferError(f"replay buffer incomplete: {exc.filename} missing") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReplayBufferError(f"{header_path}: not valid JSON ({exc})") from exc
        capacity, seed, seen, count = _check_header(header, header_path)
        if hashlib.sha256(body).hexdigest() != header["records_sha256"]:
            raise ReplayBufferError(
                f"{records_path}: sha256 does not match the header (corrupt or edited)"
            )
        records: list[Record] = []
        for number, line in enumerate(body.decode("utf-8").splitlines(), start=1):
            try:
                records.append(_record_from_json(json.loads(line)))
            except ValueError as exc:  # JSONDecodeError is a ValueError too
                raise ReplayBufferError(f"{records_path} line {number}: {exc}") from exc
        if len(records) != count:
            raise ReplayBufferError(
                f"{records_path}: {len(records)} records but the header says {count}"
            )
        try:
            return cls(capacity, seed, records=records, seen=seen)
        except ValueError as exc:
            raise ReplayBufferError(f"{header_path}: {exc}") from exc


def _check_header(header: Any, path: Path) -> tuple[int, int, int, int]:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ReplayBufferError(f"{path}: not an ftops replay buffer header")
    if header.get("version") != FORMAT_VERSION:
        raise ReplayBufferError(
            f"{path}: format version {header.get('version')!r} unsupported "
            f"(this trainer reads {FORMAT_VERSION})"
        )
    values = []
    for key in ("capacity", "seed", "seen", "count"):
        value = header.get(key)
        # bool is an int subclass; true/false here means a hand-edited file.
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ReplayBufferError(f'{path}: "{key}" must be a non-negative integer')
        values.append(value)
    if not isinstance(header.get("records_sha256"), str):
        raise ReplayBufferError(f'{path}: "records_sha256" missing')
    capacity, seed, seen, count = values
    return capacity, seed, seen, count


def _write_atomic(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
        tmp = Path(f.name)
    os.replace(tmp, path)


def lineage_buffer(
    parent_dir: Path | None,
    seed_records: Sequence[Record],
    *,
    capacity: int = DEFAULT_CAPACITY,
    seed: int = 0,
) -> ReplayBuffer:
    """The buffer a job starts from: its parent's when the parent stored one, else a new
    one seeded with ``seed_records`` (the base model's retention probes)."""
    if parent_dir is not None and ReplayBuffer.exists(parent_dir):
        return ReplayBuffer.load(parent_dir)
    buffer = ReplayBuffer(capacity, seed)
    buffer.add(seed_records)
    return buffer


def replay_count(n_new: int, ratio: float) -> int:
    """Replay records to add to ``n_new`` new ones so they make up ``ratio`` of the mix."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"replay ratio must be in [0, 1), got {ratio}")
    return round(n_new * ratio / (1.0 - ratio))


def mix_replay(
    new_records: Sequence[Record],
    buffer: ReplayBuffer,
    ratio: float = DEFAULT_REPLAY_RATIO,
    seed: int = 0,
) -> list[Record]:
    """The training set: all new records followed by replayed ones, which make up
    ``ratio`` of the result (rounded to whole records). An empty buffer replays nothing.
    Training shuffles every epoch, so the order here does not matter."""
    n = replay_count(len(new_records), ratio)
    if n == 0 or len(buffer) == 0:
        return list(new_records)
    return [*new_records, *buffer.sample(n, seed)]
