"""Versions registered as the trainer registers them (artifact uploaded with its sha256s,
version recorded, ``adapter.ready`` published), from adapter files written elsewhere:
random LoRA weights, so that tests and benchmarks get many versions in seconds instead of
one training each."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_runtime import events
from ftops_runtime.bus import EventBus

# What the registry accepts of an adapter's directory (PEFT also writes a README.md).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _read(adapter_dir: Path) -> dict[str, bytes]:
    return {name: (adapter_dir / name).read_bytes() for name in ADAPTER_FILES}


async def upload_adapter(registry: registry_pb2_grpc.RegistryServiceStub, adapter_dir: Path) -> str:
    """The adapter's files as one artifact; its id."""
    blobs = await asyncio.to_thread(_read, adapter_dir)
    files = [
        common_pb2.ArtifactFile(
            path=name, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
        )
        for name, data in blobs.items()
    ]

    async def requests() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        yield registry_pb2.UploadArtifactRequest(header=registry_pb2.UploadHeader(files=files))
        for index, data in enumerate(blobs.values()):
            yield registry_pb2.UploadArtifactRequest(
                chunk=registry_pb2.FileChunk(file_index=index, data=data)
            )

    artifact: registry_pb2.Artifact = await registry.UploadArtifact(requests())
    return artifact.artifact_id


async def register_adapter(
    registry: registry_pb2_grpc.RegistryServiceStub,
    bus: EventBus,
    adapter_dir: Path,
    *,
    adapter: str,
    base_model: str,
    team: str = "demo",
) -> registry_pb2.Version:
    """Uploaded, registered as a LoRA version of ``adapter`` and announced on
    ``adapter.ready`` as the trainer would; replicas load it from there."""
    version: registry_pb2.Version = await registry.RegisterVersion(
        registry_pb2.RegisterVersionRequest(
            adapter=adapter,
            team=team,
            base_model=base_model,
            artifact_id=await upload_adapter(registry, adapter_dir),
            method="lora",
        )
    )
    await bus.publish(
        events.ADAPTER_READY,
        events_pb2.AdapterReady(
            meta=events.new_meta("trainer", bus.instance),
            version_id=version.version_id,
            adapter=adapter,
            version_number=version.number,
            base_model=base_model,
            files=list(version.files),
            team=team,
        ),
    )
    return version
