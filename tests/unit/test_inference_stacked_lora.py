"""Stacked LoRA computes exactly what PEFT computes, for adapters of different ranks,
scalings (alpha patterns, rsLoRA), target modules and DoRA, across slot reuse and
compaction."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from ftops_inference.stacked_lora import LoRAStack

VARIANTS: list[dict[str, Any]] = [
    {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    {"r": 8, "target_modules": ["q_proj", "k_proj", "o_proj"], "lora_alpha": 32},
    {"r": 16, "target_modules": ["gate_proj", "down_proj"], "use_rslora": True},
    {"r": 8, "target_modules": ["v_proj", "up_proj"], "alpha_pattern": {"up_proj": 64}},
    {"r": 2, "target_modules": ["q_proj"]},
    {"r": 4, "target_modules": ["k_proj", "v_proj"], "lora_alpha": 3},
]


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path) -> tuple[Any, Any, list[Any]]:
    """A PEFT model holding every variant (the reference), a plain base for the stack,
    and each variant's (config, state dict)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.eval()
    plain = copy.deepcopy(base)
    reference = None
    adapters = []
    for i, variant in enumerate(VARIANTS):
        torch.manual_seed(i)
        config = LoraConfig(init_lora_weights=False, **variant)
        if reference is None:
            reference = get_peft_model(base, config, adapter_name=f"a{i}")
        else:
            reference.add_adapter(f"a{i}", config)
        state = {
            k: v.detach().clone()
            for k, v in get_peft_model_state_dict(reference, adapter_name=f"a{i}").items()
        }
        adapters.append((config, state))
    assert reference is not None
    reference.eval()
    return reference, plain, adapters


def logits(model: Any, **kwargs: Any) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 9, 3]] * 4)
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=ids, **kwargs).logits
    return out


def test_stacked_matches_peft_across_slot_reuse_and_compaction(
    models: tuple[Any, Any, list[Any]],
) -> None:
    reference, plain, adapters = models
    stack = LoRAStack(plain)
    for i, (config, state) in enumerate(adapters):
        assert stack.unsupported(config, state) is None
        stack.add(f"a{i}", config, state)

    def check(names: list[str]) -> None:
        expected = logits(reference, adapter_names=names)
        with stack.active(names, torch.device("cpu")):
            got = logits(plain)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    check(["a0", "a1", "__base__", "a2"])
    check(["a3", "a4", "a5", "a1"])
    for i in (0, 1, 2, 4):
        stack.remove(f"a{i}")
    check(["a3", "__base__", "a5", "a3"])  # after compaction
    config, state = adapters[2]
    stack.add("a2", config, state)  # reuses a freed slot
    check(["a2", "a5", "a3", "__base__"])
    with stack.active(["__base__"] * 4, torch.device("cpu")):
        torch.testing.assert_close(logits(plain), logits(reference, adapter_names=["__base__"] * 4))


def test_what_stacking_cannot_express_is_refused_with_the_reason(
    models: tuple[Any, Any, list[Any]],
) -> None:
    from peft import LoraConfig

    _, plain, adapters = models
    stack = LoRAStack(plain)
    config, state = adapters[0]
    assert "magnitude" in (stack.unsupported(LoraConfig(r=4, use_dora=True), state) or "")
    assert "lora_bias" in (stack.unsupported(LoraConfig(r=4, lora_bias=True), state) or "")
    odd = {**state, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}
    assert "not a LoRA A/B weight" in (stack.unsupported(config, odd) or "")


def test_dora_rows_compute_what_peft_computes_for_that_adapter(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.eval()
    plain = copy.deepcopy(base)
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False, use_dora=True
    )
    reference = get_peft_model(base, config, adapter_name="dora")
    for name, param in reference.named_parameters():
        if "lora_magnitude_vector" in name:  # away from |W| so the rescaling matters
            torch.nn.init.uniform_(param, 0.5, 1.5)
    reference.eval()
    state = {
        k: v.detach().clone()
        for k, v in get_peft_model_state_dict(reference, adapter_name="dora").items()
    }
    assert any(k.endswith("lora_magnitude_vector") for k in state)

    stack = LoRAStack(plain)
    assert stack.unsupported(config, state) is None
    stack.add("dora", config, state)
    expected = logits(reference)  # every row through the DoRA adapter
    with reference.disable_adapter():
        expected_base = logits(reference)
    with stack.active(["dora", "__base__", "dora", "__base__"], torch.device("cpu")):
        got = logits(plain)
    torch.testing.assert_close(got[0::2], expected[0::2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1::2], expected_base[1::2], rtol=1e-4, atol=1e-5)

    # Evicted and re-added from the state dict it hands back: the same outputs.
    _, back = stack.weights("dora")
    assert set(back) == set(state)
    stack.remove("dora")
    stack.add("dora", config, back)
    with stack.active(["dora"] * 4, torch.device("cpu")):
        torch.testing.assert_close(logits(plain), expected, rtol=1e-4, atol=1e-5)


def _lora(base: Any, rank: int, seed: int, modules: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """A plain LoRA adapter of ``rank`` on ``modules`` of every layer (random weights)."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(modules):
            prefix = f"base_model.model.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features) * 0.05
            state[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank) * 0.05
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(modules))
    return config, state


class _MatmulWork:
    """Records the batched matmuls of a forward pass: their shapes and multiply-adds."""

    def __init__(self) -> None:
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self._bmm = torch.bmm

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.shapes.append((tuple(x.shape), tuple(y.shape)))
        return self._bmm(x, y)

    @property
    def multiply_adds(self) -> int:
        return sum(x[0] * x[1] * x[2] * y[2] for x, y in self.shapes)


def test_a_large_rank_adapter_costs_the_others_nothing_loaded_or_after_unload(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's replica: a rank-4096 adapter with no traffic made every other adapter's
    batches pay for its rank, and kept doing so after it was unloaded. The others' step
    work (the matmuls of their forward pass) and the stacks' shapes must be the same
    before, during and after; only the large adapter's own rows pay for its rank."""
    from transformers import AutoModelForCausalLM

    plain: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain.eval()
    stack = LoRAStack(plain)
    modules = ("q_proj", "v_proj")
    for i, name in enumerate(("a", "b")):
        stack.add(name, *_lora(plain, 8, i, modules))
    others = ["a", "b", "a", "__base__"]

    def step(names: list[str]) -> tuple[_MatmulWork, torch.Tensor]:
        work = _MatmulWork()
        monkeypatch.setattr(torch, "bmm", work)
        try:
            with stack.active(names, torch.device("cpu")):
                out = logits(plain)
        finally:
            monkeypatch.setattr(torch, "bmm", work._bmm)
        return work, out

    before, out_before = step(others)
    shapes_before = stack.stacked_ranks()
    assert before.multiply_adds > 0
    assert {shape[1][2] for shape in before.shapes[::2]} == {8}  # x A^T at rank 8

    stack.add("big", *_lora(plain, 256, 7, modules))
    during, out_during = step(others)
    assert during.shapes == before.shapes
    torch.testing.assert_close(out_during, out_before, rtol=0, atol=0)

    # A batch with the large adapter: only its row pays for rank 256.
    mixed, _ = step(["a", "big", "b", "__base__"])
    large = [(x, y) for x, y in mixed.shapes if 256 in (y[2], x[2])]
    assert large
    assert all(x[0] == 1 for x, _ in large)

    stack.remove("big")
    after, out_after = step(others)
    assert after.shapes == before.shapes
    assert after.multiply_adds == before.multiply_adds
    assert stack.stacked_ranks() == shapes_before  # no padding left behind
    torch.testing.assert_close(out_after, out_before, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_conv1d_layers_stack_with_pefts_output(
    tiny_model_dir: Path, tmp_path: Path, use_dora: bool
) -> None:
    """GPT-2's Conv1D layers (weight [in, out], PEFT's fan_in_fan_out) stack like linear
    ones: attention (c_attn, attn.c_proj) and MLP (c_fc, mlp.c_proj), plain and DoRA."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from ftops_tinymodel.architectures import build_architecture

    base_dir = build_architecture("gpt2", tiny_model_dir, tmp_path / "gpt2")
    base: Any = AutoModelForCausalLM.from_pretrained(base_dir)
    base.eval()
    plain = copy.deepcopy(base)
    torch.manual_seed(5)
    config = LoraConfig(
        r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False, use_dora=use_dora
    )
    reference = get_peft_model(base, config, adapter_name="gpt")
    served: Any = reference.peft_config["gpt"]
    assert served.fan_in_fan_out  # PEFT sets it for Conv1D
    for name, param in reference.named_parameters():
        if "lora_magnitude_vector" in name:  # away from |W| so the rescaling matters
            torch.nn.init.uniform_(param, 0.5, 1.5)
    reference.eval()
    state = {
        k: v.detach().clone()
        for k, v in get_peft_model_state_dict(reference, adapter_name="gpt").items()
    }
    stack = LoRAStack(plain)
    assert stack.unsupported(served, state) is None
    stack.add("gpt", served, state)
    expected = logits(reference)
    with reference.disable_adapter():
        expected_base = logits(reference)
    assert not torch.allclose(expected, expected_base, atol=1e-3)  # the adapter matters
    with stack.active(["gpt", "__base__", "gpt", "__base__"], torch.device("cpu")):
        got = logits(plain)
    torch.testing.assert_close(got[0::2], expected[0::2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1::2], expected_base[1::2], rtol=1e-4, atol=1e-5)
