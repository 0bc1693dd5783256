"""``ftops-dev up --base-model``: the tiny model by default, any local Hugging Face
directory by path (refused with the reason when it is not one), the stack's settings
following the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ftops_devstack.base_model import TINY_MODEL_NAME, model_name, resolve_base_model
from ftops_models import ModelDirError


def test_the_default_is_the_tiny_model_with_its_lowered_gate(tiny_model_dir: Path) -> None:
    choice = resolve_base_model("tiny")
    assert (choice.path, choice.name, choice.tiny) == (tiny_model_dir, TINY_MODEL_NAME, True)
    assert choice.env == {"FTOPS_GATE_MIN_RETENTION": "0.3"}


def test_a_local_directory_is_served_under_its_own_name(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    local = tmp_path / "My Model v2"
    shutil.copytree(tiny_model_dir, local)
    choice = resolve_base_model(str(local))
    assert (choice.path, choice.name, choice.tiny, choice.env) == (
        local.resolve(),
        "My-Model-v2",
        False,
        {},  # the trainer's own defaults (gate 0.95)
    )


def test_a_directory_without_a_tokenizer_is_refused_naming_what_is_missing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    local = tmp_path / "model"
    shutil.copytree(tiny_model_dir, local)
    (local / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match=r"no tokenizer \(tokenizer.json"):
        resolve_base_model(str(local))
    (local / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"no safetensors weights.*; no tokenizer"):
        resolve_base_model(str(local))
    with pytest.raises(ModelDirError, match="is not a directory"):
        resolve_base_model(str(tmp_path / "nowhere"))


def test_names_fit_the_registry() -> None:
    assert model_name(Path("/m/SmolLM2 135M (instruct)")) == "SmolLM2-135M-instruct"
    assert model_name(Path("/m/...")) == "local-model"


def test_the_stack_names_the_model_and_keeps_the_default_gate_off_the_tiny_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from ftops_devstack.__main__ import dev_stack
    from ftops_devstack.stack import SERVICES

    local = tmp_path / "local"
    shutil.copytree(tiny_model_dir, local)
    choice = resolve_base_model(str(local))
    stack = dev_stack(
        tmp_path,
        "nats://127.0.0.1:1",
        "redis://127.0.0.1:2",
        choice.path,
        auth=False,
        base_model=choice,
    )
    names = [n for s in SERVICES for n in stack.names(s)] + ["gateway-http", "monitor-metrics"]
    env = stack._env("trainer", {name: 1000 + i for i, name in enumerate(names)})
    assert env["FTOPS_BASE_MODEL_NAME"] == "local"
    assert env["FTOPS_BASE_MODEL_PATH"] == str(local.resolve())
    assert "FTOPS_GATE_MIN_RETENTION" not in stack.extra_env
