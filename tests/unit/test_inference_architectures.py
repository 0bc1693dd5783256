"""Every common architecture trains with the trainer's default targets and is served with
PEFT's output (issue 15, items 5-7): tiny random-weight Llama, Qwen2, Mistral, Gemma,
Phi-3 (fused qkv_proj / gate_up_proj) and GPT-2 (Conv1D c_attn), sharing the tiny model's
tokenizer. For each: the trainer's own training function with the default targets, the
adapter written as the registry stores it (adapter_config.json + safetensors), the
inference replica's checks against the base model, then the HF backend's greedy output, in
the stacked path and in the PEFT fallback, equals PeftModel's on the same base and input."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import ftops_tinymodel
from ftops_inference.adapter_check import (
    check_adapter_config,
    check_file_names,
    check_tensor_values,
    check_tensors,
)
from ftops_inference.backend import GenerationRequest, ModuleShape
from ftops_inference.base_files import read_base
from ftops_inference.hf_backend import HFPeftBackend
from ftops_inference.sampling import SamplingConfig
from ftops_runtime.errors import FailedPrecondition
from ftops_tinymodel.architectures import ARCHITECTURES, build_architecture, greedy_texts
from ftops_trainer.dataset import Record
from ftops_trainer.params import TrainParams
from ftops_trainer.targets import default_targets_for
from ftops_trainer.training import train_adapter

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# The targets `ftops train` picks when none are named.
DEFAULT_TARGETS = {
    "llama": LLAMA_ATTENTION,
    "qwen2": LLAMA_ATTENTION,
    "mistral": LLAMA_ATTENTION,
    "gemma": LLAMA_ATTENTION,
    "phi3": ("o_proj", "qkv_proj", "gate_up_proj", "down_proj"),  # all linear layers
    "gpt2": ("c_attn",),  # PEFT's default for gpt2 (Conv1D)
}
PROMPTS = ("The capital of", "Product LZ-59 costs")
MAX_TOKENS = 8
FACTS = [Record(f["prompt"], f["completion"]) for f in ftops_tinymodel.new_facts()[:8]]
# A few steps at a rate that moves the output: the adapter must visibly matter.
PARAMS = TrainParams(max_steps=4, batch_size=4, learning_rate=0.05, seed=0)


def peft_reference(base_dir: Path, adapter_dir: Path | None) -> list[str]:
    """PEFT's greedy text, less a trailing incomplete UTF-8 character (decoded as U+FFFD),
    which the replica never sends (sampling.TextTracker)."""
    texts = greedy_texts(base_dir, adapter_dir, PROMPTS, MAX_TOKENS)
    return [text.rstrip("\ufffd") for text in texts]


def replica_checks(adapter_dir: Path, shapes: Mapping[str, ModuleShape]) -> None:
    """What the loader checks before an adapter reaches the backend."""
    check_file_names("v1", [p.name for p in adapter_dir.iterdir()])
    check_adapter_config("v1", adapter_dir)
    check_tensors("v1", adapter_dir, shapes)
    check_tensor_values("v1", adapter_dir)


async def served(base_dir: Path, adapter_dir: Path, kernel: str) -> tuple[list[str], str]:
    """The HF backend's output through the adapter, after the checks a replica runs at load,
    and which path served it ("stacked" or "peft")."""
    backend = HFPeftBackend(base_dir, lora_kernel=kernel)
    await backend.start()
    try:
        replica_checks(adapter_dir, backend.module_shapes())
        await backend.load_adapter("v1", adapter_dir)
        texts = []
        for prompt in PROMPTS:
            sampling = SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.0)
            completion = await backend.generate(GenerationRequest(prompt, sampling, "v1"))
            texts.append(completion.text)
        runtime: Any = backend._rt
        path = "stacked" if runtime.stack is not None and "v1" in runtime.stack else "peft"
        if path == "peft":
            assert "v1" in runtime.peft.peft_config
        return texts, path
    finally:
        await backend.close()


@pytest.fixture(scope="module")
def bases(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    return {arch: build_architecture(arch, tiny_model_dir, root / arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
async def test_default_targets_train_and_serve_with_peft_output(
    arch: str, bases: dict[str, Path], tmp_path: Path
) -> None:
    base_dir = bases[arch]
    assert default_targets_for("lora", base_dir) == DEFAULT_TARGETS[arch]

    adapter_dir = tmp_path / "adapter"
    result = train_adapter(base_dir, FACTS, PARAMS, adapter_dir, base_model_name=f"tiny-{arch}")
    assert result.steps == PARAMS.max_steps
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(DEFAULT_TARGETS[arch])
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    expected = peft_reference(base_dir, adapter_dir)
    assert expected != peft_reference(base_dir, None)  # the adapter changes the answers
    for kernel in ("stacked", "peft"):
        texts, path = await served(base_dir, adapter_dir, kernel)
        assert path == kernel  # GPT-2's Conv1D stacks too: no silent fallback
        assert texts == expected, (kernel, texts, expected)


def test_explicit_targets_still_win_and_a_missing_one_is_named(bases: dict[str, Path]) -> None:
    from ftops_trainer.methods import validate_method

    phi3 = bases["phi3"]
    assert validate_method(TrainParams(target_modules=("qkv_proj", "o_proj")), phi3) == []
    (problem,) = validate_method(TrainParams(target_modules=("q_proj", "o_proj")), phi3)
    assert "target module 'q_proj' is not in the base model" in problem
    assert "qkv_proj" in problem  # what it has instead
    (gpt2_problem,) = validate_method(TrainParams(target_modules=("q_proj",)), bases["gpt2"])
    assert "c_attn" in gpt2_problem
    # What a recipe for every linear layer gets on any architecture.
    assert default_targets_for("lora", bases["gpt2"], all_linear=True) == (
        "c_attn",
        "c_proj",
        "c_fc",
    )
    assert default_targets_for("lora", bases["phi3"], all_linear=True) == DEFAULT_TARGETS["phi3"]
    assert default_targets_for("lora", bases["qwen2"], all_linear=True) == (
        *LLAMA_ATTENTION,
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    # IA3 and AdaLoRA default per architecture too.
    assert default_targets_for("ia3", bases["gpt2"]) == ("c_attn", "mlp.c_proj")
    assert validate_method(TrainParams(method="ia3"), bases["gpt2"]) == []
    assert validate_method(TrainParams(method="adalora"), bases["phi3"]) == []


async def test_a_conv1d_adapter_that_does_not_fit_is_refused_and_nothing_stays(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    """GPT-2's Conv1D holds its weight [in, out]: the replica knows c_attn as 128 -> 384, so
    an adapter written with the weight's layout (A [r, out]) is refused with the reason
    before the backend sees it, and the backend holds nothing afterwards."""
    from safetensors.torch import save_file

    backend = HFPeftBackend(bases["gpt2"])
    await backend.start()
    try:
        shapes = backend.module_shapes()
        assert shapes["transformer.h.0.attn.c_attn"] == ModuleShape("linear", 128, 384)
        # Backends without transformers in-process (vLLM, echo) read the same from the
        # safetensors headers.
        from_headers, _ = read_base(bases["gpt2"])
        conv1d = {name: shape for name, shape in shapes.items() if name.startswith("transformer.h")}
        assert {name: from_headers[name] for name in conv1d} == conv1d
        prefix = "base_model.model.transformer.h.0.attn.c_attn"
        adapter = tmp_path / "bad"
        adapter.mkdir()
        save_file(
            {
                f"{prefix}.lora_A.weight": torch.zeros(4, 384),
                f"{prefix}.lora_B.weight": torch.zeros(128, 4),
            },
            str(adapter / "adapter_model.safetensors"),
        )
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(FailedPrecondition, match=r"c_attn.*does not fit.*linear 128->384"):
            replica_checks(adapter, shapes)
        assert backend.loaded() == []
    finally:
        await backend.close()
