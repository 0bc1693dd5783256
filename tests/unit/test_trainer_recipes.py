"""Recipes: the defaults a LoRA job gets for its base model's size; a field the job sets
always wins, other methods keep the plain defaults."""

from __future__ import annotations

from pathlib import Path

from ftops.trainer.v1 import trainer_pb2
from ftops_trainer.params import TrainParams
from ftops_trainer.recipes import (
    LLAMA_ALL_LINEAR,
    RECIPES_BY_NAME,
    apply_base_recipe,
    base_recipe,
    recipe_for,
    with_recipe,
)
from ftops_trainer.settings import TrainerSettings
from ftops_trainer.spec import effective_spec, train_params


def test_the_recipe_follows_the_base_models_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert recipe_for(1_600_000).name == "tiny"
    assert recipe_for(134_515_008).name == "small-lm"  # SmolLM2-135M
    assert recipe_for(7_000_000_000).name == "large-lm"
    recipe = base_recipe(tiny_model_dir)
    assert recipe is not None
    assert recipe.name == "tiny"
    assert base_recipe(tmp_path) is None  # no weights here: no recipe, plain defaults


def test_the_tiny_recipe_is_the_trainers_historical_defaults(tiny_model_dir: Path) -> None:
    spec = apply_base_recipe(trainer_pb2.JobSpec(adapter="a"), tiny_model_dir)
    params = train_params(effective_spec(spec, TrainerSettings()))
    d = TrainParams()
    assert (params.r, params.alpha, params.learning_rate, params.num_epochs) == (
        d.r,
        d.alpha,
        d.learning_rate,
        d.num_epochs,
    )
    assert params.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (params.batch_size, params.lr_scheduler) == (d.batch_size, d.lr_scheduler)


def test_a_small_model_gets_lora_on_every_linear_layer_unless_told_otherwise() -> None:
    small = RECIPES_BY_NAME["small-lm"]
    spec = with_recipe(trainer_pb2.JobSpec(adapter="a"), small)
    assert tuple(spec.lora.target_modules) == LLAMA_ALL_LINEAR
    assert (spec.lora.r, spec.lora.alpha) == (16, 32)
    hp = spec.hyperparameters
    assert (hp.learning_rate, hp.num_epochs, hp.batch_size, hp.lr_scheduler) == (
        2e-3,
        12,
        8,
        "constant",
    )
    assert spec.replay.HasField("ratio")
    assert spec.replay.ratio == 0.1

    told = trainer_pb2.JobSpec(adapter="a")
    told.lora.r = 4
    told.lora.target_modules.append("v_proj")
    told.hyperparameters.num_epochs = 3
    told.replay.ratio = 0.0
    spec = with_recipe(told, small)
    assert (spec.lora.r, list(spec.lora.target_modules)) == (4, ["v_proj"])
    assert (spec.hyperparameters.num_epochs, spec.hyperparameters.learning_rate) == (3, 2e-3)
    assert spec.replay.ratio == 0.0
    # Targets are named for Llama-family blocks only; others keep their own default.
    assert list(with_recipe(trainer_pb2.JobSpec(), small, "gpt2").lora.target_modules) == []
    # A child version keeps its parent's shape: no targets added.
    child = with_recipe(trainer_pb2.JobSpec(parent_version_id="v1"), small)
    assert list(child.lora.target_modules) == []
    # Other methods keep the plain defaults.
    ia3 = trainer_pb2.JobSpec(method="ia3")
    assert with_recipe(ia3, small) == ia3


def test_a_handful_of_facts_gets_enough_steps_unless_the_job_names_its_epochs() -> None:
    from ftops_trainer.recipes import fit_epochs, recipe_epochs

    small, tiny = RECIPES_BY_NAME["small-lm"], RECIPES_BY_NAME["tiny"]
    assert recipe_epochs(small, 6, 8) == 36  # one step an epoch: 36 epochs
    assert recipe_epochs(small, 20, 8) == 12  # three steps an epoch: the recipe's 12
    assert recipe_epochs(small, 400, 8) == 12
    assert recipe_epochs(tiny, 6, 8) == 40
    asked = trainer_pb2.JobSpec(adapter="a")
    spec = with_recipe(asked, small)
    fit_epochs(asked, spec, small, 6)
    assert spec.hyperparameters.num_epochs == 36
    asked.hyperparameters.num_epochs = 5
    spec = with_recipe(asked, small)
    fit_epochs(asked, spec, small, 6)
    assert spec.hyperparameters.num_epochs == 5
