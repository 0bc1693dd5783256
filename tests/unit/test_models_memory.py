"""Bad input at a base model's registration, on the tiny model: a directory without a
tokenizer or with weights cut short, and a model too large for the configured memory, are
refused before any weight is loaded, with the reason (and the estimate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftops_devstack.base_model import resolve_base_model
from ftops_models import (
    ModelDirError,
    ModelTooLarge,
    check_base_model,
    check_memory,
    estimate_memory,
)
from ftops_models.memory import available_memory, count_parameters


@pytest.fixture
def local_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    local = tmp_path / "model"
    shutil.copytree(tiny_model_dir, local)
    return local


def test_the_estimate_counts_every_weight_from_the_headers(tiny_model_dir: Path) -> None:
    from safetensors.numpy import load_file

    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    expected = sum(int(t.size) for t in weights.values())
    assert count_parameters(tiny_model_dir) == expected
    estimate = estimate_memory(tiny_model_dir, "float32")
    assert estimate.weight_bytes == expected * 4
    assert estimate_memory(tiny_model_dir, "bfloat16").weight_bytes == expected * 2
    assert f"{expected / 1e6:,.1f}M parameters x 4 bytes (float32)" in estimate.describe()


def test_a_sharded_model_is_counted_over_its_shards(local_model: Path) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(local_model / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(local_model / shard))
    (local_model / "model.safetensors").unlink()
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (local_model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert count_parameters(local_model) == sum(int(t.size) for t in weights.values())


def test_a_model_too_large_for_the_configured_memory_is_refused_with_the_estimate(
    local_model: Path,
) -> None:
    weight_mb = estimate_memory(local_model, "float32").weight_bytes / 2**20
    # The weights may take 80% of the limit: refused just below weights / 0.8, kept above.
    with pytest.raises(ModelTooLarge, match=r"too large to load: [\d.]+M parameters x 4 bytes"):
        check_memory(local_model, limit_mb=weight_mb / 0.8 * 0.99, dtype="float32")
    assert check_memory(local_model, limit_mb=weight_mb / 0.8 * 1.01, dtype="float32")
    with pytest.raises(ModelTooLarge, match="of the configured 1 MiB"):
        check_base_model(local_model, limit_mb=1, dtype="float32")
    # A model too large is refused by the dev stack too, before anything starts.
    with pytest.raises(ModelTooLarge, match=r"= 2\.6 MiB of weights"):
        resolve_base_model(str(local_model), max_memory_mb=1)
    # Without a configured limit the memory available now is the limit (the tiny model fits).
    available = available_memory()
    assert available is not None
    assert available > 0
    assert check_memory(local_model).parameters == count_parameters(local_model)


def test_weights_cut_short_are_refused_naming_the_file(local_model: Path) -> None:
    weights = local_model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelDirError, match=r"model.safetensors is truncated: its tensors need"):
        check_base_model(local_model)
    weights.write_bytes(data[:4])
    with pytest.raises(ModelDirError, match="empty or truncated"):
        check_base_model(local_model)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelDirError, match="not safetensors or is truncated"):
        check_base_model(local_model)


def test_a_directory_without_a_tokenizer_is_refused_before_its_size_is_looked_at(
    local_model: Path,
) -> None:
    (local_model / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match=r"no tokenizer") as refused:
        check_base_model(local_model, limit_mb=1)
    assert not isinstance(refused.value, ModelTooLarge)


def test_the_inference_service_refuses_such_a_model_before_loading_it(local_model: Path) -> None:
    from ftops_inference.service import InferenceService
    from ftops_inference.settings import InferenceSettings

    settings = InferenceSettings(base_model_path=str(local_model), max_model_memory_mb=1)
    with pytest.raises(ModelTooLarge, match="of the configured 1 MiB"):
        InferenceService(settings)
    (local_model / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match="no tokenizer"):
        InferenceService(InferenceSettings(base_model_path=str(local_model)))


def test_the_trainer_refuses_a_job_on_a_model_too_large_for_it_at_submit(
    tiny_model_dir: Path,
) -> None:
    from typing import Any, cast

    from ftops.registry.v1 import registry_pb2
    from ftops.trainer.v1 import trainer_pb2
    from ftops_trainer.intake import Intake
    from ftops_trainer.settings import TrainerSettings

    spec = trainer_pb2.JobSpec(adapter="a", base_model="tiny", dataset_jsonl=b"{}")
    base = registry_pb2.BaseModel(name="tiny", uri=str(tiny_model_dir))
    registry = cast(Any, None)  # the check reads the directory only
    Intake(TrainerSettings(), registry)._check_method(spec, base)
    with pytest.raises(ModelTooLarge, match=r"x 4 bytes \(float32\).*configured 1 MiB"):
        Intake(TrainerSettings(max_model_memory_mb=1), registry)._check_method(spec, base)
