"""Artifact uploads are verified before anything is kept; names never become paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ftops_registry.artifacts import (
    FileSpec,
    LocalArtifactStore,
    UploadSession,
    read_verified,
    validate_file_name,
    validate_manifest,
)
from ftops_runtime.errors import DataLoss, InvalidArgument

CONFIG = b'{"r": 8}'
WEIGHTS = b"\x00\x01" * 3000


def spec(path: str, data: bytes) -> FileSpec:
    return FileSpec(path, hashlib.sha256(data).hexdigest(), len(data))


def stored_blobs(store: LocalArtifactStore) -> list[Path]:
    return [p for p in (store.root / "sha256").rglob("*") if p.is_file()]


def upload(
    store: LocalArtifactStore, files: list[tuple[FileSpec, bytes]], chunk: int = 1000
) -> None:
    session = UploadSession(store, [s for s, _ in files])
    try:
        for index, (_, data) in enumerate(files):
            for start in range(0, len(data), chunk):
                session.write(index, data[start : start + chunk])
        session.finish()
    except BaseException:
        session.abort()
        raise


def test_roundtrip_stores_by_sha_and_reads_back(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    files = [
        (spec("adapter_config.json", CONFIG), CONFIG),
        (spec("w.safetensors", WEIGHTS), WEIGHTS),
    ]
    upload(store, files)
    sha = files[1][0].sha256
    assert store.blob_path(sha) == tmp_path / "sha256" / sha[:2] / sha[2:4] / sha
    assert b"".join(read_verified(store, files[1][0], "art")) == WEIGHTS
    assert not list(store.tmp_dir.iterdir())
    assert not any("safetensors" in str(p) for p in stored_blobs(store))


def test_sha_mismatch_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    good = spec("adapter_config.json", CONFIG)
    lying = FileSpec("adapter_model.safetensors", "f" * 64, len(WEIGHTS))
    with pytest.raises(DataLoss, match=r"adapter_model\.safetensors"):
        upload(store, [(good, CONFIG), (lying, WEIGHTS)])
    assert stored_blobs(store) == []
    assert not list(store.tmp_dir.iterdir())


def test_size_mismatch_is_refused(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    short = FileSpec("w.safetensors", hashlib.sha256(WEIGHTS).hexdigest(), len(WEIGHTS) + 5)
    with pytest.raises(InvalidArgument, match=r"w\.safetensors"):
        upload(store, [(short, WEIGHTS)])
    long = FileSpec("w.safetensors", hashlib.sha256(WEIGHTS).hexdigest(), 10)
    with pytest.raises(InvalidArgument, match="more bytes"):
        upload(store, [(long, WEIGHTS)])
    assert stored_blobs(store) == []


def test_chunks_out_of_order_are_refused(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    session = UploadSession(store, [spec("a.json", CONFIG), spec("b.json", CONFIG)])
    session.write(0, CONFIG)
    session.write(1, CONFIG[:2])
    with pytest.raises(InvalidArgument, match="order"):
        session.write(0, CONFIG)
    with pytest.raises(InvalidArgument, match="index 5"):
        session.write(5, CONFIG)
    session.abort()
    assert not list(store.tmp_dir.iterdir())


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../etc/passwd", "/abs", "a/b", "a\\b", "x..y", "bad\nname"]
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_file_name(name)


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "model.pt", "m.PTH", "data.pkl", "last.ckpt"]
)
def test_pickles_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="safetensors only"):
        validate_file_name(name)


def test_manifest_checks() -> None:
    ok = spec("adapter_config.json", CONFIG)
    validate_manifest([ok], max_total_bytes=100)
    with pytest.raises(InvalidArgument, match="no files"):
        validate_manifest([], max_total_bytes=100)
    with pytest.raises(InvalidArgument, match="twice"):
        validate_manifest([ok, ok], max_total_bytes=100)
    with pytest.raises(InvalidArgument, match="sha256"):
        validate_manifest([FileSpec("a.json", "XYZ", 1)], max_total_bytes=100)
    with pytest.raises(InvalidArgument, match="allowed"):
        validate_manifest([ok], max_total_bytes=3)


def test_corrupt_or_missing_blob_is_data_loss(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    weights = spec("w.safetensors", WEIGHTS)
    upload(store, [(weights, WEIGHTS)])
    store.blob_path(weights.sha256).write_bytes(WEIGHTS[:-1] + b"\xff")
    with pytest.raises(DataLoss, match="corrupt"):
        list(read_verified(store, weights, "art"))
    store.blob_path(weights.sha256).unlink()
    with pytest.raises(DataLoss, match="missing"):
        list(read_verified(store, weights, "art"))


def test_empty_file_is_fine(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    empty = spec("empty.json", b"")
    upload(store, [(empty, b""), (spec("c.json", CONFIG), CONFIG)])
    assert store.exists(empty.sha256)
