"""A diverged run's adapter (NaN, Inf, absurd magnitudes) fails its job before anything
is uploaded or registered, naming the tensor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ftops_runtime.errors import FailedPrecondition
from ftops_trainer.weights_check import check_trained_weights

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def adapter(directory: Path, b: torch.Tensor) -> Path:
    torch.manual_seed(0)
    save_file(
        {
            KEY.replace("lora_B", "lora_A"): torch.randn(8, 32) * 0.02,
            KEY: b,
            "step": torch.tensor([3]),  # integer tensors carry no weights to check
        },
        str(directory / "adapter_model.safetensors"),
    )
    return directory


def test_trained_weights_pass(tmp_path: Path) -> None:
    check_trained_weights(adapter(tmp_path, torch.randn(32, 8) * 0.02))


@pytest.mark.parametrize(
    ("value", "match"),
    [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (3e38, "up to 3e[+]38")],
)
def test_diverged_weights_fail_naming_the_tensor(tmp_path: Path, value: float, match: str) -> None:
    b = torch.randn(32, 8) * 0.02
    b[5, 3] = value  # one value is enough
    with pytest.raises(FailedPrecondition, match=re.escape(KEY) + ".*" + match):
        check_trained_weights(adapter(tmp_path, b))
