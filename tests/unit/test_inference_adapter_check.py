"""Adapter artifacts are checked before loading: file names (no pickles) and LoRA tensor
shapes against the base model's modules, reading only safetensors headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ftops.registry.v1 import registry_pb2
from ftops_inference.adapter_check import (
    check_adapter_config,
    check_file_names,
    check_tensors,
)
from ftops_inference.backend import ModuleShape
from ftops_inference.loader import AdapterLoader
from ftops_runtime.errors import FailedPrecondition

BASE = {
    "model.layers.0.self_attn.q_proj": ModuleShape("linear", 128, 128),
    "model.layers.0.self_attn.v_proj": ModuleShape("linear", 128, 64),
    "model.embed_tokens": ModuleShape("embedding", 768, 128),
}
PREFIX = "base_model.model."


def write_adapter(directory: Path, tensors: dict[str, list[int]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {PREFIX + k: torch.zeros(shape) for k, shape in tensors.items()},
        str(directory / "adapter_model.safetensors"),
    )
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return directory


GOOD = {
    "model.layers.0.self_attn.q_proj.lora_A.weight": [4, 128],
    "model.layers.0.self_attn.q_proj.lora_B.weight": [128, 4],
    "model.layers.0.self_attn.v_proj.lora_A.weight": [4, 128],
    "model.layers.0.self_attn.v_proj.lora_B.weight": [64, 4],
}


def test_matching_adapter_passes(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path, GOOD)
    check_adapter_config("ver_1", adapter)
    check_tensors("ver_1", adapter, BASE)


def test_embedding_lora_passes(tmp_path: Path) -> None:
    adapter = write_adapter(
        tmp_path,
        {
            "model.embed_tokens.lora_embedding_A": [4, 768],
            "model.embed_tokens.lora_embedding_B": [128, 4],
        },
    )
    check_tensors("ver_1", adapter, BASE)


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    # Trained on a base whose v_proj has 128 outputs (no grouped-query attention).
    tensors = dict(GOOD)
    tensors["model.layers.0.self_attn.v_proj.lora_B.weight"] = [128, 4]
    adapter = write_adapter(tmp_path, tensors)
    with pytest.raises(FailedPrecondition, match=r"v_proj.lora_B.weight.*does not fit"):
        check_tensors("ver_1", adapter, BASE)


def test_module_missing_from_base_is_refused(tmp_path: Path) -> None:
    tensors = dict(GOOD)
    tensors["model.layers.7.self_attn.q_proj.lora_A.weight"] = [4, 128]
    tensors["model.layers.7.self_attn.q_proj.lora_B.weight"] = [128, 4]
    adapter = write_adapter(tmp_path, tensors)
    with pytest.raises(FailedPrecondition, match=r"layers\.7.*does not have"):
        check_tensors("ver_1", adapter, BASE)


def test_rank_disagreement_is_refused(tmp_path: Path) -> None:
    tensors = dict(GOOD)
    tensors["model.layers.0.self_attn.q_proj.lora_B.weight"] = [128, 8]
    adapter = write_adapter(tmp_path, tensors)
    with pytest.raises(FailedPrecondition, match="disagree on rank"):
        check_tensors("ver_1", adapter, BASE)


def test_non_lora_tensor_is_refused(tmp_path: Path) -> None:
    tensors = dict(GOOD)
    tensors["lm_head.weight"] = [768, 128]
    adapter = write_adapter(tmp_path, tensors)
    with pytest.raises(FailedPrecondition, match="unexpected tensor"):
        check_tensors("ver_1", adapter, BASE)


def test_garbage_safetensors_is_refused(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path, GOOD)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(FailedPrecondition, match="not a valid safetensors"):
        check_tensors("ver_1", adapter, BASE)


def test_non_lora_config_is_refused(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path, GOOD)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(FailedPrecondition, match="only LoRA"):
        check_adapter_config("ver_1", adapter)


@pytest.mark.parametrize(
    "names",
    [
        ["adapter_config.json", "adapter_model.bin"],
        ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt"],
        ["adapter_config.json", "../adapter_model.safetensors"],
        ["adapter_model.safetensors"],
        ["adapter_config.json"],
    ],
)
def test_file_names_refused(names: list[str]) -> None:
    with pytest.raises(FailedPrecondition, match="ver_1"):
        check_file_names("ver_1", names)


class _NoDownloadRegistry:
    """GetVersion answers with a pickle artifact; DownloadArtifact must never be called."""

    def __init__(self, version: registry_pb2.Version) -> None:
        self.version = version
        self.downloads = 0

    async def GetVersion(self, request: Any, timeout: float | None = None) -> Any:
        return self.version

    def DownloadArtifact(self, request: Any, timeout: float | None = None) -> Any:
        self.downloads += 1
        raise AssertionError("a refused artifact must not be downloaded")


class _NoBackend:
    def module_shapes(self) -> dict[str, ModuleShape]:
        return BASE

    def loaded(self) -> list[str]:
        return []


async def test_pickle_artifact_is_refused_before_download(tmp_path: Path) -> None:
    from ftops.common.v1 import common_pb2

    version = registry_pb2.Version(
        version_id="ver_pickle",
        adapter="bot",
        base_model_fingerprint="fp",
        artifact_id="a1",
        files=[
            common_pb2.ArtifactFile(path="adapter_config.json", sha256="0" * 64, size_bytes=2),
            common_pb2.ArtifactFile(path="adapter_model.bin", sha256="1" * 64, size_bytes=9),
        ],
    )
    registry = _NoDownloadRegistry(version)
    loader = AdapterLoader(
        registry=registry,  # type: ignore[arg-type]
        backend=_NoBackend(),  # type: ignore[arg-type]
        cache_dir=tmp_path,
        base_fingerprint="fp",
    )
    with pytest.raises(FailedPrecondition, match=r"adapter_model\.bin.*never pickles"):
        await loader.ensure_loaded("ver_pickle")
    assert registry.downloads == 0
    assert loader.loaded_id("ver_pickle") is None
    assert loader.records["ver_pickle"].error
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240


async def test_other_base_fingerprint_is_refused(tmp_path: Path) -> None:
    version = registry_pb2.Version(
        version_id="ver_other", base_model="big", base_model_fingerprint="other"
    )
    loader = AdapterLoader(
        registry=_NoDownloadRegistry(version),  # type: ignore[arg-type]
        backend=_NoBackend(),  # type: ignore[arg-type]
        cache_dir=tmp_path,
        base_fingerprint="fp",
    )
    with pytest.raises(FailedPrecondition, match="trained on base model 'big'"):
        await loader.ensure_loaded("ver_other")


def test_dora_magnitude_vectors_pass_with_one_value_per_output(tmp_path: Path) -> None:
    magnitude = "model.layers.0.self_attn.v_proj.lora_magnitude_vector"
    check_tensors("ver_1", write_adapter(tmp_path / "ok", {**GOOD, magnitude: [64]}), BASE)
    with pytest.raises(FailedPrecondition, match=r"lora_magnitude_vector.*does not fit"):
        check_tensors("ver_1", write_adapter(tmp_path / "bad", {**GOOD, magnitude: [128]}), BASE)
