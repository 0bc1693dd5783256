"""Client side of the registry's artifact download: stream the files into a directory and
verify them, so every service that fetches adapters applies the same checks."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import grpc

from ftops.common.v1 import common_pb2
from ftops.registry.v1 import registry_pb2
from ftops_runtime.errors import DataLoss, NotFound, PermissionDenied, Unavailable


def safe_file_name(label: str, path: str) -> str:
    """Artifact paths are plain file names; anything else could escape the directory."""
    if not path or "/" in path or "\\" in path or path in {".", ".."} or "\x00" in path:
        raise DataLoss(f"{label}: artifact holds a file with an unsafe path {path!r}")
    return path


async def download_artifact(
    registry: Any,
    artifact_id: str,
    dest: Path,
    *,
    label: str,
    expected: Sequence[common_pb2.ArtifactFile] = (),
    check_names: Callable[[list[str]], None] | None = None,
    timeout: float = 300.0,
    team: str = "",
) -> list[common_pb2.ArtifactFile]:
    """Download ``artifact_id`` into the directory ``dest`` (created if missing).

    ``expected`` (e.g. a version's declared files) must match the manifest's file set when
    given; sizes are enforced while writing (a lying server cannot fill the disk) and every
    sha256 is checked at the end. ``check_names`` may refuse file names (file types) before
    anything is written. ``label`` starts every error message (``version ver_x``).
    ``team``: download on behalf of that team (the registry refuses an artifact the team
    may not use, whatever the caller's own key may read).
    """
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    declared = {f.path: f for f in expected}
    names: list[str] = []
    handles: list[IO[bytes]] = []
    digests: list[hashlib._Hash] = []
    sizes: list[int] = []
    call = registry.DownloadArtifact(
        registry_pb2.DownloadArtifactRequest(artifact_id=artifact_id, team=team), timeout=timeout
    )
    try:
        async for message in call:
            if message.HasField("manifest"):
                if names:
                    raise DataLoss(f"{label}: two manifests in the download")
                files = list(message.manifest.files)
                paths = [safe_file_name(label, f.path) for f in files]
                if check_names is not None:
                    check_names(paths)
                if not declared:
                    declared = {f.path: f for f in files}
                elif set(paths) != set(declared):
                    raise DataLoss(
                        f"{label}: artifact {artifact_id} holds {sorted(paths)}, "
                        f"expected {sorted(declared)}"
                    )
                for path in paths:
                    names.append(path)
                    handles.append((dest / path).open("wb"))
                    digests.append(hashlib.sha256())
                    sizes.append(0)
                continue
            if not names:
                raise DataLoss(f"{label}: a chunk arrived before the manifest")
            index = message.chunk.file_index
            if index >= len(names):
                raise DataLoss(f"{label}: chunk for unknown file #{index}")
            data = message.chunk.data
            sizes[index] += len(data)
            if sizes[index] > declared[names[index]].size_bytes:
                raise DataLoss(
                    f"{label}: {names[index]} is larger than the declared "
                    f"{declared[names[index]].size_bytes} bytes"
                )
            digests[index].update(data)
            handles[index].write(data)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise NotFound(f"{label}: artifact {artifact_id} is not stored") from exc
        if exc.code() == grpc.StatusCode.DATA_LOSS:
            raise DataLoss(f"{label}: {exc.details()}") from exc
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED:  # no retry changes the answer
            raise PermissionDenied(f"{label}: {exc.details()}") from exc
        raise Unavailable(
            f"{label}: downloading artifact {artifact_id} failed: {exc.details()}"
        ) from exc
    finally:
        for handle in handles:
            handle.close()
    if not names:
        raise DataLoss(f"{label}: the download carried no manifest")
    for i, name in enumerate(names):
        want = declared[name]
        if sizes[i] != want.size_bytes:
            raise DataLoss(
                f"{label}: size mismatch for {name} ({sizes[i]} bytes, declared {want.size_bytes})"
            )
        if digests[i].hexdigest() != want.sha256:
            raise DataLoss(f"{label}: sha256 mismatch for {name}")
    return [declared[name] for name in names]
