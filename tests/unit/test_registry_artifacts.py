"""Artifact uploads are verified before anything is kept; names never become paths, only
the names artifacts consist of are accepted, and adapters above the rank limit are refused."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from ftops_registry.artifacts import (
    ARTIFACT_FILES,
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
        validate_manifest([FileSpec("dataset.jsonl", "XYZ", 1)], max_total_bytes=100)
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


@pytest.mark.parametrize(
    "name",
    [
        "x.pkl2",  # the near-misses, let in by a suffix rule
        "adapter_model.bin.",
        "adapter_model.safetensors.",
        "w.safetensors",
        "README.md",
        "adapter_config.json ",
    ],
)
def test_only_the_names_artifacts_consist_of_are_accepted(name: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"{re.escape(repr(name))} refused"):
        validate_file_name(name)


def test_every_name_the_trainer_uploads_is_accepted() -> None:
    # adapter (and partial fine-tune), dataset, replay buffer: what the trainer sends.
    for name in ARTIFACT_FILES:
        validate_file_name(name)
    assert set(ARTIFACT_FILES) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "dataset.jsonl",
        "replay_buffer.json",
        "replay_buffer.jsonl",
    }


def lora_weights(rank: int) -> bytes:
    from safetensors.torch import save

    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    return save(
        {
            f"{prefix}.lora_A.weight": torch.zeros(rank, 16),
            f"{prefix}.lora_B.weight": torch.zeros(16, rank),
        }
    )


def test_adapter_rank_above_the_limit_is_refused_at_upload(tmp_path: Path) -> None:
    """A rank-4096 adapter was stored, registered and loaded; the rank is the tensors'
    (the safetensors header streaming by) and the config's, checked before anything is kept."""
    store = LocalArtifactStore(tmp_path)
    config = json.dumps({"peft_type": "LORA", "r": 8}).encode()
    ok = lora_weights(8)
    upload(
        store,
        [
            (spec("adapter_config.json", config), config),
            (spec("adapter_model.safetensors", ok), ok),
        ],
    )

    big = lora_weights(512)
    big_files = [
        (spec("adapter_config.json", config), config),
        (spec("adapter_model.safetensors", big), big),
    ]
    with pytest.raises(
        InvalidArgument, match=r"lora_A\.weight' has LoRA rank 512, above the limit of 256"
    ):
        upload(store, big_files, chunk=7)  # the header arrives in pieces
    assert not list(store.tmp_dir.iterdir())

    lying = json.dumps({"peft_type": "LORA", "r": 4096}).encode()
    with pytest.raises(InvalidArgument, match=r"rank 4096 \(r\).*max_lora_rank"):
        upload(
            store,
            [
                (spec("adapter_config.json", lying), lying),
                (spec("adapter_model.safetensors", ok), ok),
            ],
        )


def test_rank_limit_is_a_setting(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    big = lora_weights(512)
    session = UploadSession(store, [spec("adapter_model.safetensors", big)], max_lora_rank=512)
    session.write(0, big)
    session.finish()
