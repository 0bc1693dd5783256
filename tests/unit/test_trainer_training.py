"""LoRA training on the tiny model: loss falls, only safetensors come out, and the
adapter changes what the model says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ftops_tinymodel
from ftops_trainer.dataset import Record
from ftops_trainer.training import (
    ADAPTER_FILES,
    NothingToTrain,
    TrainingStopped,
    TrainParams,
    total_steps,
    train_adapter,
)

FACTS = [Record(**f) for f in ftops_tinymodel.new_facts()[:8]]
FEW_STEPS = TrainParams(num_epochs=6, batch_size=4, learning_rate=5e-3)


@pytest.fixture(scope="module")
def trained(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    seen: list[tuple[int, int, float]] = []
    result = train_adapter(
        tiny_model_dir,
        FACTS,
        FEW_STEPS,
        out,
        base_model_name="tiny",
        progress=lambda s, t, loss: seen.append((s, t, loss)),
    )
    assert result.steps == total_steps(len(FACTS), FEW_STEPS) == 12
    assert [s for s, _, _ in seen] == list(range(1, 13))
    return out, result.losses


def test_loss_decreases(trained: tuple[Path, list[float]]) -> None:
    _, losses = trained
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2


def test_adapter_is_config_and_safetensors_only(trained: tuple[Path, list[float]]) -> None:
    out, _ = trained
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == "tiny"  # not this host's path
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    assert weights
    assert all("lora_" in k for k in weights)


def test_adapter_changes_the_output(
    tiny_model_dir: Path, trained: tuple[Path, list[float]]
) -> None:
    out, _ = trained
    base, tok = ftops_tinymodel.load(tiny_model_dir)
    tuned, _ = ftops_tinymodel.load(tiny_model_dir, out)
    ids = tok(FACTS[0].prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-4)


def test_continue_from_parent_and_stop_flag(
    tiny_model_dir: Path, trained: tuple[Path, list[float]], tmp_path: Path
) -> None:
    parent, parent_losses = trained
    child = train_adapter(
        tiny_model_dir,
        FACTS,
        TrainParams(num_epochs=1, batch_size=4, r=4),  # r is ignored: the parent's shape wins
        tmp_path / "child",
        parent_adapter_dir=parent,
    )
    # It starts where the parent ended, not from scratch.
    assert child.losses[0] < parent_losses[0] * 0.7
    assert json.loads((tmp_path / "child" / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(TrainingStopped):
        train_adapter(tiny_model_dir, FACTS, FEW_STEPS, tmp_path / "x", should_stop=lambda: True)


def test_prompts_longer_than_cutoff_leave_nothing_to_train(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(NothingToTrain, match="cutoff_len=4"):
        train_adapter(tiny_model_dir, FACTS, TrainParams(cutoff_len=4), tmp_path / "a")
