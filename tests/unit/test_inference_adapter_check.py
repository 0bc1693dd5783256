"""Adapter artifacts are checked before loading: file names (no pickles) and LoRA tensor
shapes against the base model's modules, reading only safetensors headers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ftops.registry.v1 import registry_pb2
from ftops_inference.adapter_check import (
    AdapterLimits,
    check_adapter_config,
    check_file_names,
    check_tensor_values,
    check_tensors,
)
from ftops_inference.backend import ModuleShape
from ftops_inference.loader import AdapterLoader, public_error
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


def test_non_lora_config_is_refused_where_the_backend_serves_lora_only(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path, GOOD)
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    check_adapter_config("ver_1", adapter)  # the HF backend serves prefix tuning
    vllm = AdapterLimits(methods=("LORA",), backend="vllm")
    with pytest.raises(FailedPrecondition, match=r"backend \(vllm\) serves lora adapters only"):
        check_adapter_config("ver_1", adapter, vllm)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(FailedPrecondition, match="serves lora, adalora, ia3"):
        check_adapter_config("ver_1", adapter)


@pytest.mark.parametrize(
    "names",
    [
        ["adapter_config.json", "adapter_model.bin"],
        ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt"],
        ["adapter_config.json", "../adapter_model.safetensors"],
        ["adapter_model.safetensors"],
        ["adapter_config.json"],
        # Only the two names an adapter consists of: a weights file under another name
        # passed, then failed at load with FileNotFoundError(<cache path>).
        ["adapter_config.json", "weights.safetensors"],
        ["adapter_config.json", "adapter_model.safetensors", "extra.safetensors"],
        ["adapter_config.json", "adapter_model.safetensors", "x.pkl2"],
        ["adapter_config.json", "adapter_model.bin."],
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


def write_weights(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {PREFIX + k: v for k, v in tensors.items()}, str(directory / "adapter_model.safetensors")
    )
    return directory


def real_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {key: torch.randn(shape) * 0.02 for key, shape in GOOD.items()}


def test_finite_weights_of_a_sane_magnitude_pass(tmp_path: Path) -> None:
    check_tensor_values("ver_1", write_weights(tmp_path, real_weights()))


@pytest.mark.parametrize(
    ("poison", "match"),
    [
        (lambda t: torch.full_like(t, float("nan")), "non-finite"),
        (lambda t: torch.full_like(t, float("inf")), "non-finite"),
        (
            lambda t: t.index_put_(
                (torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"))
            ),
            "non-finite",
        ),
        (lambda t: torch.full_like(t, -float("inf")), "non-finite"),
        (lambda t: torch.full_like(t, 3e38), "up to 3e[+]38"),
    ],
    ids=["all-nan", "inf", "one-nan", "-inf", "near-float-max"],
)
def test_non_finite_or_absurd_weights_are_refused_naming_the_tensor(
    tmp_path: Path, poison: Any, match: str
) -> None:
    """The issue's copies of a real adapter (NaN, +Inf, one NaN, ~3e38) loaded and served
    nonsense; they are refused, and the message names the tensor."""
    weights = real_weights()
    key = "model.layers.0.self_attn.v_proj.lora_B.weight"
    weights[key] = poison(weights[key].clone())
    adapter = write_weights(tmp_path, weights)
    with pytest.raises(FailedPrecondition, match=re.escape(PREFIX + key) + ".*" + match):
        check_tensor_values("ver_1", adapter)


def test_magnitude_limit_is_a_setting(tmp_path: Path) -> None:
    weights = {key: torch.full(shape, 0.5) for key, shape in GOOD.items()}
    adapter = write_weights(tmp_path, weights)
    check_tensor_values("ver_1", adapter, AdapterLimits(max_abs_weight=1.0))
    with pytest.raises(FailedPrecondition, match="max_adapter_weight"):
        check_tensor_values("ver_1", adapter, AdapterLimits(max_abs_weight=0.25))


def test_rank_above_the_limit_is_refused(tmp_path: Path) -> None:
    """A consistent rank-4096 adapter loaded and served; ranks above max_lora_rank are
    refused, by the tensors' shapes and by the config PEFT would build layers from."""
    big = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": [512, 128],
        "model.layers.0.self_attn.q_proj.lora_B.weight": [128, 512],
    }
    adapter = write_adapter(tmp_path / "big", big)
    with pytest.raises(FailedPrecondition, match=r"rank 512, above this replica's limit of 256"):
        check_tensors("ver_1", adapter, BASE)
    check_tensors("ver_1", adapter, BASE, AdapterLimits(max_rank=512))

    config = write_adapter(tmp_path / "cfg", GOOD)
    (config / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "rank_pattern": {"q_proj": 4096}})
    )
    with pytest.raises(FailedPrecondition, match=r"rank 4096 \(q_proj\).*max_lora_rank"):
        check_adapter_config("ver_1", config)


def test_errors_never_name_server_paths(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    missing = cache / "ver_1" / "adapter_model.safetensors"
    message = public_error(FileNotFoundError(2, "No such file or directory", str(missing)), cache)
    assert message == "adapter_model.safetensors: No such file or directory"
    wrapped = public_error(ValueError(f"cannot read {missing!s}, giving up"), cache)
    assert str(tmp_path) not in wrapped
    assert "adapter_model.safetensors" in wrapped

    adapter = write_adapter(tmp_path / "a", GOOD)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(FailedPrecondition) as refused:
        check_adapter_config("ver_1", adapter)
    assert str(tmp_path) not in str(refused.value)
