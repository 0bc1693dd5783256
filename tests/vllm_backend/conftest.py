"""The vLLM tests: they run where vLLM imports (``make test-vllm``, in .venv-vllm with vLLM's
CPU build, or a GPU machine with the vllm extra) and skip everywhere else, so the main
environment's ``make test`` collects them without failing. Cases that need CUDA are also
marked ``gpu`` and skip without one.

Adapters are written here directly as PEFT saves them (adapter_config.json and
adapter_model.safetensors), with random weights strong enough to change sampled text, so
the vLLM environment needs no PEFT."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from ftops_inference.vllm_backend import vllm_installed

HERE = Path(__file__).resolve().parent
VLLM_MISSING = not vllm_installed()

MakeLora = Callable[..., Path]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not VLLM_MISSING:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here: `make test-vllm` runs these")
    for item in items:
        if Path(item.path).is_relative_to(HERE):
            item.add_marker(skip)


def write_lora(
    model_dir: Path,
    out: Path,
    seed: int,
    *,
    rank: int = 8,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    std: float = 0.2,
) -> Path:
    """A LoRA adapter for the model in ``model_dir`` on the ``targets`` of every layer."""
    import torch
    from safetensors.torch import save_file

    from ftops_inference.base_files import read_base

    shapes, _ = read_base(model_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, shape in sorted(shapes.items()):
        if shape.kind != "linear" or module.rsplit(".", 1)[-1] not in targets:
            continue
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(
            rank, shape.in_features, generator=generator
        ).mul_(std)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(
            shape.out_features, rank, generator=generator
        ).mul_(std)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="session")
def make_lora() -> MakeLora:
    return write_lora
