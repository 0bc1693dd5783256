"""The shared artifact download: names, sizes and sha256 are checked before a file is
trusted."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ftops.common.v1 import common_pb2
from ftops.registry.v1 import registry_pb2
from ftops_runtime.artifacts import download_artifact
from ftops_runtime.errors import DataLoss, InvalidArgument

CONFIG = b'{"peft_type": "LORA"}'
WEIGHTS = b"\x01" * 3000


def _entry(path: str, data: bytes) -> common_pb2.ArtifactFile:
    return common_pb2.ArtifactFile(
        path=path, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
    )


class _Registry:
    """Sends a manifest, then the given bodies in 1000-byte chunks."""

    def __init__(self, manifest: list[common_pb2.ArtifactFile], bodies: list[bytes]) -> None:
        self.manifest, self.bodies = manifest, bodies

    def DownloadArtifact(self, request: Any, timeout: float) -> AsyncIterator[Any]:
        async def stream() -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
            yield registry_pb2.DownloadArtifactResponse(
                manifest=registry_pb2.Artifact(artifact_id="a", files=self.manifest)
            )
            for index, body in enumerate(self.bodies):
                for start in range(0, len(body), 1000):
                    yield registry_pb2.DownloadArtifactResponse(
                        chunk=registry_pb2.FileChunk(
                            file_index=index, data=body[start : start + 1000]
                        )
                    )

        return stream()


async def test_download_verifies_and_writes(tmp_path: Path) -> None:
    files = [_entry("adapter_config.json", CONFIG), _entry("adapter_model.safetensors", WEIGHTS)]
    got = await download_artifact(
        _Registry(files, [CONFIG, WEIGHTS]), "a", tmp_path / "out", label="v1", expected=files
    )
    assert [f.path for f in got] == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == WEIGHTS


async def test_sha256_mismatch_is_data_loss(tmp_path: Path) -> None:
    files = [_entry("adapter_model.safetensors", WEIGHTS)]
    tampered = b"\x02" + WEIGHTS[1:]
    with pytest.raises(DataLoss, match=r"sha256 mismatch for adapter_model\.safetensors"):
        await download_artifact(_Registry(files, [tampered]), "a", tmp_path, label="v1")


async def test_file_larger_than_declared_stops_the_download(tmp_path: Path) -> None:
    declared = [_entry("adapter_model.safetensors", WEIGHTS[:1500])]
    with pytest.raises(DataLoss, match="larger than the declared 1500 bytes"):
        await download_artifact(_Registry(declared, [WEIGHTS]), "a", tmp_path, label="v1")


async def test_manifest_must_match_declared_files(tmp_path: Path) -> None:
    sent = [_entry("adapter_model.safetensors", WEIGHTS)]
    declared = [_entry("adapter_config.json", CONFIG), *sent]
    with pytest.raises(DataLoss, match="expected"):
        await download_artifact(
            _Registry(sent, [WEIGHTS]), "a", tmp_path, label="v1", expected=declared
        )


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".."])
async def test_unsafe_names_are_refused_before_writing(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataLoss, match="unsafe path"):
        await download_artifact(
            _Registry([_entry(name, WEIGHTS)], [WEIGHTS]), "a", tmp_path / "d", label="v1"
        )
    assert list((tmp_path / "d").iterdir()) == []


async def test_name_hook_refuses_pickles(tmp_path: Path) -> None:
    def only_safetensors(names: list[str]) -> None:
        if any(not n.endswith(".safetensors") for n in names):
            raise InvalidArgument("safetensors only")

    files = [_entry("pytorch_model.bin", WEIGHTS)]
    with pytest.raises(InvalidArgument):
        await download_artifact(
            _Registry(files, [WEIGHTS]), "a", tmp_path, label="v1", check_names=only_safetensors
        )
    assert not (tmp_path / "pytorch_model.bin").exists()
