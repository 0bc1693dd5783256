"""Artifact blobs: a store interface, a local-directory store, and the upload session that
verifies every byte against what the client declared before anything is kept.

Blobs are addressed by their sha256 only; the file names a client sends are labels in the
manifest and never touch the filesystem. Only the names artifacts consist of are accepted,
and an adapter's LoRA ranks are checked while its bytes stream in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ftops_runtime.errors import DataLoss, InvalidArgument

CHUNK_BYTES = 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Formats that execute code when loaded. Adapters travel as safetensors only.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
MAX_NAME_LEN = 255
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Every name an artifact consists of, as the trainer uploads them and the services read
# them: an adapter (a partial fine-tune has the same two files), a dataset, a replay
# buffer. A suffix rule let near-misses in (``x.pkl2``, ``adapter_model.bin.``).
ARTIFACT_FILES = (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    "dataset.jsonl",
    "replay_buffer.json",
    "replay_buffer.jsonl",
)
DEFAULT_MAX_LORA_RANK = 256
# Beyond these an adapter's config / safetensors header is not inspected (a real one is
# a few KB / well under 1 MiB); the replica that loads it checks it in full anyway.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
# LoRA tensor name -> which dimension is the rank.
_RANK_DIM = {"lora_A.weight": 0, "lora_embedding_A": 0, "lora_B.weight": -1, "lora_embedding_B": -1}


@dataclass(frozen=True)
class FileSpec:
    """One declared file of an artifact."""

    path: str
    sha256: str
    size: int


def validate_file_name(name: str) -> None:
    """A relative, single-component label: no directories, no traversal, no oddities."""
    if not name or name in (".", ".."):
        raise InvalidArgument(f"artifact file name {name!r} is empty or a directory reference")
    if len(name) > MAX_NAME_LEN:
        raise InvalidArgument(f"artifact file name {name[:40]!r}... is longer than 255 chars")
    if "/" in name or "\\" in name or ".." in name or name.startswith("~"):
        raise InvalidArgument(
            f"artifact file name {name!r} must be a plain file name (no '/', '\\', '..')"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArgument(f"artifact file name {name!r} contains control characters")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise InvalidArgument(
            f"artifact file {name!r} is a pickle-based format; safetensors only "
            "(save adapters with save_pretrained(safe_serialization=True))"
        )
    if name not in ARTIFACT_FILES:
        raise InvalidArgument(
            f"artifact file {name!r} refused: an artifact consists of files named "
            f"{', '.join(ARTIFACT_FILES)} only"
        )


def validate_manifest(files: Sequence[FileSpec], *, max_total_bytes: int) -> None:
    if not files:
        raise InvalidArgument("the upload header lists no files")
    seen: set[str] = set()
    total = 0
    for spec in files:
        validate_file_name(spec.path)
        if spec.path in seen:
            raise InvalidArgument(f"artifact file {spec.path!r} is listed twice")
        seen.add(spec.path)
        if not SHA256_RE.match(spec.sha256):
            raise InvalidArgument(
                f"artifact file {spec.path!r}: sha256 must be 64 lower-case hex digits, "
                f"got {spec.sha256!r}"
            )
        total += spec.size
    if total > max_total_bytes:
        raise InvalidArgument(
            f"artifact declares {total} bytes, more than the {max_total_bytes} allowed"
        )


class BlobWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self, sha256: str) -> None:
        """Make the written bytes the blob for ``sha256`` (atomically)."""

    def discard(self) -> None: ...


class ArtifactStore(Protocol):
    """Content-addressed blob storage. Local disk today; an object store fits the same
    calls (multipart upload, existence, ranged read, delete)."""

    def new_blob(self) -> BlobWriter: ...

    def exists(self, sha256: str) -> bool: ...

    def open(self, sha256: str) -> BinaryIO:
        """Open a blob for reading; ``FileNotFoundError`` when it is missing."""

    def delete(self, sha256: str, *, written_before: float) -> int:
        """Remove a blob (garbage collection) unless it was (re)written at or after
        ``written_before`` (epoch seconds: an upload racing the collection keeps it);
        the bytes freed, 0 if it was gone or kept."""


class SpooledBlobWriter:
    """An upload spooled to a temporary file in ``tmp_dir``. ``commit`` makes it durable and
    hands the finished file to ``publish`` (which moves or copies it into the store), then
    removes whatever is left; ``discard`` drops it."""

    def __init__(self, tmp_dir: Path, publish: Callable[[str, Path], None]) -> None:
        self._publish = publish
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self._path = Path(name)
        self._fh: BinaryIO | None = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        assert self._fh is not None
        self._fh.write(data)

    def commit(self, sha256: str) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        try:
            self._publish(sha256, self._path)
        finally:
            self._path.unlink(missing_ok=True)

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._path.unlink(missing_ok=True)


class LocalArtifactStore:
    """Blobs under ``<root>/sha256/ab/cd/<sha256>``; uploads land in ``<root>/tmp`` first
    (same filesystem, so the final rename is atomic)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (root / "sha256").mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256[2:4] / sha256

    def new_blob(self) -> BlobWriter:
        return SpooledBlobWriter(self.tmp_dir, self._publish)

    def _publish(self, sha256: str, spooled: Path) -> None:
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Same content, same name: replacing an existing blob is harmless and atomic.
        os.replace(spooled, target)

    def exists(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        return self.blob_path(sha256).open("rb")

    def delete(self, sha256: str, *, written_before: float) -> int:
        path = self.blob_path(sha256)
        try:
            st = path.stat()
            if st.st_mtime >= written_before:
                return 0
            size = st.st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size


class AdapterRanks:
    """Checks an adapter's LoRA ranks as its bytes stream by: the config's ``r`` (and
    ``rank_pattern``), kept whole, and the tensor shapes in the safetensors header (the
    weights file's first bytes). What does not parse is left to the replica, which refuses
    it at load; what parses and asks for too high a rank is refused here."""

    def __init__(self, max_rank: int) -> None:
        self._max_rank = max_rank
        self._config = bytearray()
        self._header = bytearray()
        self._header_checked = False

    def feed(self, name: str, data: bytes) -> None:
        if name == ADAPTER_CONFIG and len(self._config) <= MAX_CONFIG_BYTES:
            self._config += data
        elif name == ADAPTER_WEIGHTS and not self._header_checked:
            self._header += data
            self._check_header()

    def finish(self) -> None:
        if not self._config or len(self._config) > MAX_CONFIG_BYTES:
            return
        try:
            config = json.loads(self._config)
        except ValueError:
            return
        if not isinstance(config, dict):
            return
        pattern = config.get("rank_pattern")
        ranks = {k: config.get(k) for k in ("r", "init_r")}
        ranks |= pattern if isinstance(pattern, dict) else {}
        for where, rank in ranks.items():
            if isinstance(rank, int) and rank > self._max_rank:
                raise InvalidArgument(
                    f"artifact file {ADAPTER_CONFIG!r} asks for LoRA rank {rank} ({where}), "
                    f"above the limit of {self._max_rank} (max_lora_rank)"
                )

    def _check_header(self) -> None:
        if len(self._header) < 8:
            return
        (length,) = struct.unpack("<Q", self._header[:8])
        if length > MAX_HEADER_BYTES:
            self._done()
            return
        if len(self._header) < 8 + length:
            return
        try:
            header = json.loads(self._header[8 : 8 + length])
        except ValueError:
            header = None
        self._done()
        if isinstance(header, dict):
            self._check_shapes(header)

    def _check_shapes(self, header: Mapping[str, Any]) -> None:
        for key, entry in header.items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            dim = next((d for kind, d in _RANK_DIM.items() if key.endswith("." + kind)), None)
            if dim is None or not isinstance(shape, list) or len(shape) != 2:
                continue
            rank = shape[dim]
            if isinstance(rank, int) and rank > self._max_rank:
                raise InvalidArgument(
                    f"artifact file {ADAPTER_WEIGHTS!r}: tensor {key!r} has LoRA rank {rank}, "
                    f"above the limit of {self._max_rank} (max_lora_rank)"
                )

    def _done(self) -> None:
        self._header_checked = True
        self._header = bytearray()


class UploadSession:
    """Receives one artifact's chunks in file order, hashing as they arrive.

    Nothing becomes a blob until ``finish`` has checked every file's size and sha256 (and
    an adapter's LoRA ranks); any failure discards all temporary data (call ``abort`` on
    errors you raise yourself).
    """

    def __init__(
        self,
        store: ArtifactStore,
        files: Sequence[FileSpec],
        *,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
    ) -> None:
        self._store = store
        self.files = list(files)
        self._ranks = AdapterRanks(max_lora_rank)
        self._writers: list[BlobWriter] = []
        self._hash = hashlib.sha256()
        self._received = 0
        self._index = -1  # the file being received

    def _advance_to(self, index: int) -> None:
        while self._index < index:
            if self._index >= 0:
                self._check_current()
            self._index += 1
            self._writers.append(self._store.new_blob())
            self._hash = hashlib.sha256()
            self._received = 0

    def _check_current(self) -> None:
        spec = self.files[self._index]
        if self._received != spec.size:
            raise InvalidArgument(
                f"artifact file {spec.path!r}: received {self._received} bytes, "
                f"the header declared {spec.size}"
            )
        actual = self._hash.hexdigest()
        if actual != spec.sha256:
            raise DataLoss(
                f"artifact file {spec.path!r}: sha256 of the received bytes is {actual}, "
                f"the header declared {spec.sha256}; nothing was stored"
            )

    def write(self, file_index: int, data: bytes) -> None:
        if file_index >= len(self.files):
            raise InvalidArgument(
                f"chunk for file index {file_index}, but the header lists {len(self.files)} files"
            )
        if file_index < self._index:
            raise InvalidArgument(
                f"chunk for file index {file_index} after file {self._index}: "
                "send files in header order"
            )
        self._advance_to(file_index)
        spec = self.files[file_index]
        if self._received + len(data) > spec.size:
            raise InvalidArgument(
                f"artifact file {spec.path!r}: more bytes than the {spec.size} declared"
            )
        self._hash.update(data)
        self._received += len(data)
        self._ranks.feed(spec.path, data)
        self._writers[file_index].write(data)

    def finish(self) -> None:
        """Verify the last files (empty ones included) and commit every blob."""
        self._advance_to(len(self.files) - 1)
        self._check_current()
        self._ranks.finish()
        for spec, writer in zip(self.files, self._writers, strict=True):
            writer.commit(spec.sha256)
        self._writers = []

    def abort(self) -> None:
        for writer in self._writers:
            writer.discard()
        self._writers = []


def read_verified(store: ArtifactStore, spec: FileSpec, artifact_id: str) -> Iterator[bytes]:
    """Yield a blob in chunks, re-checking size and sha256 (bit rot, tampering)."""
    try:
        fh = store.open(spec.sha256)
    except FileNotFoundError:
        raise DataLoss(
            f"artifact {artifact_id}: the blob for {spec.path!r} ({spec.sha256}) is missing"
        ) from None
    digest = hashlib.sha256()
    size = 0
    with fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            if size > spec.size:
                break
            yield chunk
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise DataLoss(
            f"artifact {artifact_id}: the stored blob for {spec.path!r} is corrupt "
            f"(expected sha256 {spec.sha256}, {spec.size} bytes)"
        )
