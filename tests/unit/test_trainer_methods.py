"""The PEFT methods on the tiny model: each trains and exports an artifact a loader can
apply; parents continue trainable whatever their method; submit-time validation."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ftops_tinymodel
from ftops_trainer.dataset import Record
from ftops_trainer.methods import MethodUnavailable, apply_adapter, load_partial, validate_method
from ftops_trainer.training import (
    ADAPTER_FILES,
    InvalidTrainParams,
    TrainingStopped,
    TrainParams,
    train_adapter,
)

FACTS = [Record(f["prompt"], f["completion"]) for f in ftops_tinymodel.new_facts()[:8]]
SHORT = {"num_epochs": 2, "batch_size": 4, "learning_rate": 1e-2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One torch thread: OpenMP pools crawl (10-100x) when other processes share the
    cores, and one thread keeps float reductions repeatable."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _logits(model: Any, tok: Any, prompt: str) -> torch.Tensor:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits[:, -ids.shape[1] :]
    return out


@pytest.mark.parametrize(
    ("method", "options", "peft_type"),
    [
        ("lora", {"use_dora": True, "use_rslora": True}, "LORA"),
        ("adalora", {"learning_rate": 3e-2}, "ADALORA"),
        ("ia3", {"target_modules": ("k_proj", "v_proj", "down_proj"), "learning_rate": 0.1}, "IA3"),
        ("prompt_tuning", {"num_virtual_tokens": 4, "learning_rate": 0.1}, "PROMPT_TUNING"),
        ("prefix_tuning", {"num_virtual_tokens": 4, "learning_rate": 3e-2}, "PREFIX_TUNING"),
    ],
)
def test_peft_methods_train_and_load(
    tiny_model_dir: Path, tmp_path: Path, method: str, options: dict[str, object], peft_type: str
) -> None:
    from peft import PeftModel

    out = tmp_path / method
    params = TrainParams(method=method, **{**SHORT, **options})  # type: ignore[arg-type]
    result = train_adapter(tiny_model_dir, FACTS, params, out, base_model_name="tiny")
    assert result.method == method
    first_epoch, second_epoch = result.losses[:2], result.losses[2:]
    assert sum(second_epoch) < sum(first_epoch)  # same 8 examples, 2 steps an epoch
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    assert config["base_model_name_or_path"] == "tiny"
    if method == "lora":
        assert config["use_dora"] is True
        assert config["use_rslora"] is True
    if method == "ia3":  # PEFT's feed-forward module for Llama, among the targets
        assert config["feedforward_modules"] == ["down_proj"]

    base, tok = ftops_tinymodel.load(tiny_model_dir)
    plain = _logits(base, tok, FACTS[0].prompt)
    tuned = PeftModel.from_pretrained(base, str(out))  # type: ignore[arg-type]
    assert not torch.allclose(plain, _logits(tuned, tok, FACTS[0].prompt), atol=1e-4)


def test_adalora_prunes_to_its_rank_budget(tiny_model_dir: Path, tmp_path: Path) -> None:
    params = TrainParams(method="adalora", r=4, target_r=2, num_epochs=5, batch_size=4)
    train_adapter(tiny_model_dir, FACTS, params, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["total_step"] == 10
    pattern = config["rank_pattern"]
    assert len(pattern) == 16  # 4 attention projections x 4 layers
    # update_and_allocate ran: the kept ranks add up to target_r per module on average.
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(pattern)


def test_adalora_resumes_with_its_rank_allocator_state(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Its importance statistics and rank pattern live outside the weights: a checkpoint
    # without them would prune differently after a restart.
    params = TrainParams(
        method="adalora", r=4, target_r=2, num_epochs=5, batch_size=4, checkpoint_every=4
    )
    train_adapter(tiny_model_dir, FACTS, params, tmp_path / "full", checkpoint_dir=tmp_path / "c1")
    calls = itertools.count()
    with pytest.raises(TrainingStopped):
        train_adapter(
            tiny_model_dir,
            FACTS,
            params,
            tmp_path / "resumed",
            checkpoint_dir=tmp_path / "c2",
            should_stop=lambda: next(calls) >= 6,
        )
    resumed = train_adapter(
        tiny_model_dir,
        FACTS,
        params,
        tmp_path / "resumed",
        checkpoint_dir=tmp_path / "c2",
        resume=True,
    )
    assert resumed.resumed_from_step == 4
    config = "adapter_config.json"  # carries the final rank pattern
    full = json.loads((tmp_path / "full" / config).read_text())
    assert json.loads((tmp_path / "resumed" / config).read_text()) == full
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_partial_trains_only_the_top_layers_and_loads_onto_the_base(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "partial"
    train_adapter(
        tiny_model_dir,
        FACTS,
        TrainParams(method="partial", num_layers=2, **SHORT),  # type: ignore[arg-type]
        out,
        base_model_name="tiny",
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == "partial"
    assert config["layers"] == [2, 3]
    assert config["layers_module"] == "model.layers"
    assert config["base_model_name_or_path"] == "tiny"
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {k.split(".")[2] for k in weights} == {"2", "3"}  # model.layers.N....
    assert "model.layers.3.mlp.down_proj.weight" in weights

    loaded, tok = ftops_tinymodel.load(tiny_model_dir)
    base: Any = loaded
    before = _logits(base, tok, FACTS[0].prompt)
    untouched = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    assert id(load_partial(base, out)) == id(base)  # in place
    assert not torch.allclose(before, _logits(base, tok, FACTS[0].prompt), atol=1e-4)
    assert torch.equal(base.model.layers[0].mlp.down_proj.weight, untouched)
    assert torch.equal(
        base.model.layers[3].mlp.down_proj.weight,
        weights["model.layers.3.mlp.down_proj.weight"],
    )

    fresh, _ = ftops_tinymodel.load(tiny_model_dir)
    applied = apply_adapter(fresh, out)  # type: ignore[arg-type]  # picks load_partial
    assert torch.equal(_logits(applied, tok, FACTS[0].prompt), _logits(base, tok, FACTS[0].prompt))

    # A base of another shape is refused, not half-applied.
    config["num_hidden_layers"] = 6
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="made for 6 layers"):
        load_partial(base, out)


@pytest.mark.parametrize(
    ("method", "options"),
    [("partial", {"num_layers": 1}), ("prompt_tuning", {"num_virtual_tokens": 4})],
)
def test_parents_continue_trainable_with_their_own_method(
    tiny_model_dir: Path, tmp_path: Path, method: str, options: dict[str, object]
) -> None:
    parent_params = TrainParams(method=method, **SHORT, **options)  # type: ignore[arg-type]
    parent = train_adapter(tiny_model_dir, FACTS, parent_params, tmp_path / "parent")
    # The child asks for LoRA: the parent's method wins.
    child = train_adapter(
        tiny_model_dir,
        FACTS,
        TrainParams(method="lora", num_epochs=1, batch_size=4, learning_rate=1e-2),
        tmp_path / "child",
        parent_adapter_dir=tmp_path / "parent",
    )
    assert child.method == method
    assert child.losses[0] < parent.losses[0]  # starts from the parent's weights
    parent_w = load_file(str(tmp_path / "parent" / "adapter_model.safetensors"))
    child_w = load_file(str(tmp_path / "child" / "adapter_model.safetensors"))
    assert parent_w.keys() == child_w.keys()
    assert any(not torch.equal(parent_w[k], child_w[k]) for k in parent_w)  # it trained


def test_validate_method_reports_every_problem_without_loading_weights(
    tiny_model_dir: Path,
) -> None:
    def problems(**kw: object) -> list[str]:
        return validate_method(TrainParams(**kw), tiny_model_dir)  # type: ignore[arg-type]

    assert problems() == []
    assert problems(method="ia3", target_modules=("k_proj", "v_proj", "down_proj")) == []
    assert problems(method="partial", num_layers=4) == []
    (missing,) = problems(target_modules=("q_proj", "query_key_value"))
    assert "'query_key_value' is not in the base model" in missing
    assert "q_proj" in missing  # names what there is
    (not_linear,) = problems(target_modules=("mlp",))
    assert "LlamaMLP" in not_linear
    (ff,) = problems(method="ia3", target_modules=("k_proj",), feedforward_modules=("down_proj",))
    assert "feedforward_modules ['down_proj'] are not among the target_modules" in ff
    assert problems(method="partial", num_layers=5) == ["partial num_layers=5 must be in [1, 4]"]
    assert problems(method="prompt_tuning", num_virtual_tokens=0) == [
        "prompt_tuning needs num_virtual_tokens >= 1"
    ]
    assert "not supported" in problems(method="bitfit")[0]
    assert "use_dora applies to" in problems(method="ia3", use_dora=True)[0]
    assert "target_r=16 must not exceed" in problems(method="adalora", target_r=16)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_qlora_without_cuda_names_lora_as_the_fallback(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(MethodUnavailable, match="use method 'lora' instead"):
        train_adapter(tiny_model_dir, FACTS, TrainParams(method="qlora"), tmp_path / "q")
    assert any("'lora'" in p for p in validate_method(TrainParams(method="qlora"), tiny_model_dir))


def test_invalid_params_fail_before_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidTrainParams) as info:
        train_adapter(
            tiny_model_dir,
            FACTS,
            TrainParams(lr_scheduler="step", grad_accum_steps=0, target_modules=("nope",)),
            tmp_path / "x",
        )
    message = str(info.value)
    assert "lr_scheduler='step'" in message
    assert "grad_accum_steps=0" in message
    assert "'nope' is not in the base model" in message
