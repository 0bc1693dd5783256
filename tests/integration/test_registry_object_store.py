"""The NATS JetStream Object Store artifact store against the real NATS fixture: blobs
named by sha256, shared between stores (machines), a hash mismatch refused with nothing
stored, garbage collection's time guard, and a registry serving artifacts from it."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import grpc
import nats
import nats.js.errors
import pytest

from ftops.common.v1 import common_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_registry.app import RegistryApp
from ftops_registry.artifacts import FileSpec, UploadSession, read_verified
from ftops_registry.artifacts_nats import NatsObjectArtifactStore, digest_matches
from ftops_registry.settings import RegistrySettings
from ftops_runtime.client import channel
from ftops_runtime.errors import DataLoss

pytestmark = pytest.mark.integration
DATA = bytes(range(256)) * 2000  # several object-store chunks
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
async def bucket(nats_url: str) -> AsyncIterator[str]:
    name = f"test-artifacts-{uuid.uuid4().hex[:8]}"
    yield name
    nc = await nats.connect(nats_url)
    try:  # the NATS server is shared by the whole session: leave no bucket behind
        await nc.jetstream().delete_object_store(name)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


@pytest.fixture
def store(tmp_path: Path, nats_url: str, bucket: str) -> Iterator[NatsObjectArtifactStore]:
    s = NatsObjectArtifactStore(nats_url, bucket, tmp_dir=tmp_path / "a")
    yield s
    s.close()


def _upload(store: NatsObjectArtifactStore, data: bytes, declared: str) -> None:
    session = UploadSession(store, [FileSpec("adapter_model.safetensors", declared, len(data))])
    try:
        session.write(0, data)
        session.finish()
    except BaseException:
        session.abort()
        raise


def test_blobs_are_shared_between_stores_and_verified(
    store: NatsObjectArtifactStore, tmp_path: Path, nats_url: str, bucket: str
) -> None:
    assert not store.exists(SHA)
    _upload(store, DATA, SHA)
    assert store.exists(SHA)
    other = NatsObjectArtifactStore(nats_url, bucket, tmp_dir=tmp_path / "b")  # another machine
    try:
        spec = FileSpec("adapter_model.safetensors", SHA, len(DATA))
        assert b"".join(read_verified(other, spec, "art")) == DATA
        with pytest.raises(FileNotFoundError):
            other.open("0" * 64)
    finally:
        other.close()
    assert not list((tmp_path / "a").iterdir())  # spool files are gone


def test_a_hash_mismatch_stores_nothing(store: NatsObjectArtifactStore) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DataLoss, match="nothing was stored"):
        _upload(store, DATA, wrong)
    assert not store.exists(wrong)
    assert not store.exists(SHA)


def test_names_are_never_anything_but_a_sha256(store: NatsObjectArtifactStore) -> None:
    for name in ("../etc/passwd", "ABC", ""):
        with pytest.raises(ValueError, match="not a sha256"):
            store.exists(name)


def test_delete_spares_a_blob_written_after_the_cutoff(store: NatsObjectArtifactStore) -> None:
    before_upload = time.time() - 1
    _upload(store, DATA, SHA)
    assert store.delete(SHA, written_before=before_upload) == 0  # (re)written since: kept
    assert store.exists(SHA)
    assert store.delete(SHA, written_before=time.time() + 1) == len(DATA)
    assert not store.exists(SHA)
    assert store.delete(SHA, written_before=time.time() + 1) == 0


def test_digest_format() -> None:
    import base64

    raw = hashlib.sha256(b"x").digest()
    digest = "SHA-256=" + base64.urlsafe_b64encode(raw).decode()
    assert digest_matches(digest, raw.hex())
    assert not digest_matches(digest, "0" * 64)
    assert not digest_matches("MD5=abc", raw.hex())


@pytest.fixture
async def registry(tmp_path: Path, nats_url: str, bucket: str) -> AsyncIterator[RegistryApp]:
    app = RegistryApp(
        RegistrySettings(
            grpc_port=0,
            nats_url=nats_url,
            database_url=f"sqlite:///{tmp_path}/registry.db",
            artifact_dir=tmp_path / "spool",
            artifact_store="nats",
            artifact_bucket=bucket,
            health_interval_s=0.1,
            shutdown_grace_s=1,
            instance_id=f"obs-{uuid.uuid4().hex[:6]}",
            auth_mode="disabled",
        ),
        durable=f"registry-obs-{uuid.uuid4().hex[:8]}",
    )
    await app.start()
    await app.wait_ready()
    yield app
    await app.stop()


async def test_registry_serves_artifacts_from_the_object_store(registry: RegistryApp) -> None:
    files = [
        common_pb2.ArtifactFile(path="adapter_model.safetensors", sha256=SHA, size_bytes=len(DATA))
    ]

    async def requests() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        yield registry_pb2.UploadArtifactRequest(header=registry_pb2.UploadHeader(files=files))
        yield registry_pb2.UploadArtifactRequest(
            chunk=registry_pb2.FileChunk(file_index=0, data=DATA)
        )

    async with channel(registry.address) as ch:
        stub = cast(
            "registry_pb2_grpc.RegistryServiceAsyncStub", registry_pb2_grpc.RegistryServiceStub(ch)
        )
        artifact = await stub.UploadArtifact(requests())
        received = b""
        async for part in stub.DownloadArtifact(
            registry_pb2.DownloadArtifactRequest(artifact_id=artifact.artifact_id)
        ):
            received += part.chunk.data
        assert received == DATA

        files[0].sha256 = hashlib.sha256(b"other").hexdigest()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UploadArtifact(requests())
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert not registry.store.exists(files[0].sha256)
