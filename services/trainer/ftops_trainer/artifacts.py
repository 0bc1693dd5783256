"""Moving adapter artifacts to and from the registry over its streaming RPCs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from ftops.common.v1 import common_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_runtime import hashing
from ftops_runtime.errors import DataLoss

CHUNK_BYTES = 1024 * 1024


def describe_files(directory: Path, names: Sequence[str]) -> list[common_pb2.ArtifactFile]:
    """The artifact manifest entries (path, sha256, size) for files in ``directory``."""
    return [
        common_pb2.ArtifactFile(
            path=name,
            sha256=hashing.sha256_file(directory / name),
            size_bytes=(directory / name).stat().st_size,
        )
        for name in names
    ]


def local_artifact_id(files: Sequence[common_pb2.ArtifactFile]) -> str:
    return hashing.manifest_id((f.path, f.sha256, f.size_bytes) for f in files)


async def _upload_parts(
    directory: Path, files: Sequence[common_pb2.ArtifactFile], team: str
) -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
    yield registry_pb2.UploadArtifactRequest(
        header=registry_pb2.UploadHeader(files=files, team=team)
    )
    for index, f in enumerate(files):
        with (directory / f.path).open("rb") as fh:
            while data := fh.read(CHUNK_BYTES):
                yield registry_pb2.UploadArtifactRequest(
                    chunk=registry_pb2.FileChunk(file_index=index, data=data)
                )


async def upload_artifact(
    registry: registry_pb2_grpc.RegistryServiceAsyncStub,
    directory: Path,
    files: Sequence[common_pb2.ArtifactFile],
    *,
    team: str = "",
    timeout: float = 300.0,
) -> registry_pb2.Artifact:
    """Stream the header then 1 MiB chunks, file after file; the registry checks hashes.

    ``team`` is the team the artifact is for (the job's): needed when the trainer's key
    is a trainer in several teams, and what lets that team's versions use it.
    The returned artifact id is checked against ours: a mismatch means the registry
    stored something other than what we trained.
    """
    artifact: registry_pb2.Artifact = await registry.UploadArtifact(
        _upload_parts(directory, files, team), timeout=timeout
    )
    expected = local_artifact_id(files)
    if artifact.artifact_id != expected:
        raise DataLoss(
            f"registry stored artifact {artifact.artifact_id!r} but the adapter's "
            f"manifest id is {expected!r}"
        )
    return artifact
