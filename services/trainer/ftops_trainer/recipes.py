"""Named training recipes: the defaults a LoRA job gets for its base model's size, for every
field the job leaves unset (a field it sets always wins).

- ``tiny`` (under 50M parameters: the dev stack's 1.6M-parameter model): LoRA r 8 on the
  attention projections, lr 2e-3, 40 epochs, constant schedule: the tiny model learns its
  40 new facts at exact match 1.0 in ~7 s (the trainer's historical defaults).
- ``small-lm`` (50M to 3B: SmolLM2-135M-Instruct and its like): LoRA r 16 (alpha 32) on
  every linear layer of the block (attention and MLP: q/k/v/o, gate/up/down), lr 2e-3,
  12 epochs but at least 36 optimizer steps (a handful of facts gets more epochs), batch 8,
  constant schedule, replay 0.1. On SmolLM2-135M on CPU it learned 20
  new chat facts at exact match 0.9 (attention-only r 8, 8 epochs learned the answers'
  form and none of the facts: the gate passed it before it measured learning); the
  figures of ``bench/forgetting_real`` are in docs/training.md.
- ``large-lm`` (3B and more): as ``small-lm`` with lr 1e-4 and 3 epochs, the usual
  starting point for models of that size; not measured here (no such model on this CPU).

The job record's effective spec shows the values it ran with, and the recipe's name is in
the trainer's log; ``ftops train`` sets none of these unless told, so the recipe applies.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ftops.trainer.v1 import trainer_pb2
from ftops_trainer.params import TrainParams

log = logging.getLogger(__name__)

# Llama-family names of every linear layer of a transformer block.
LLAMA_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_ATTENTION = LLAMA_ALL_LINEAR[:4]
# Model types whose blocks use those names.
LLAMA_FAMILY = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo"}
)


@dataclass(frozen=True)
class Recipe:
    name: str
    up_to_parameters: float  # chosen for bases with fewer parameters than this
    r: int
    alpha: int
    all_linear: bool  # attention and MLP projections (else attention only)
    learning_rate: float
    num_epochs: int
    batch_size: int
    lr_scheduler: str
    replay_ratio: float
    # Epochs rise until a job makes at least this many optimizer steps: a handful of facts
    # is one step an epoch, and 12 steps do not teach a 135M model a fact.
    min_steps: int = 0


RECIPES = (
    Recipe("tiny", 50e6, 8, 16, False, 2e-3, 40, 8, "constant", 0.1),
    Recipe("small-lm", 3e9, 16, 32, True, 2e-3, 12, 8, "constant", 0.1, min_steps=36),
    Recipe("large-lm", float("inf"), 16, 32, True, 1e-4, 3, 8, "constant", 0.1, min_steps=36),
)
RECIPES_BY_NAME = {r.name: r for r in RECIPES}


def recipe_for(parameters: int) -> Recipe:
    return next(r for r in RECIPES if parameters < r.up_to_parameters)


def model_type(base_dir: Path) -> str:
    try:
        return str(json.loads((base_dir / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def with_recipe(
    spec: trainer_pb2.JobSpec, recipe: Recipe, model_type: str = "llama"
) -> trainer_pb2.JobSpec:
    """The spec with the recipe's values in every field it leaves unset. Only LoRA jobs
    (the default method) take a recipe; other methods keep the plain defaults."""
    if spec.method not in ("", "lora"):
        return spec
    out = trainer_pb2.JobSpec()
    out.CopyFrom(spec)
    lora, hp = out.lora, out.hyperparameters
    lora.r = lora.r or recipe.r
    lora.alpha = lora.alpha or recipe.alpha
    if not lora.target_modules and model_type in LLAMA_FAMILY and not spec.parent_version_id:
        lora.target_modules.extend(LLAMA_ALL_LINEAR if recipe.all_linear else LLAMA_ATTENTION)
    hp.learning_rate = hp.learning_rate or recipe.learning_rate
    hp.num_epochs = hp.num_epochs or recipe.num_epochs
    hp.batch_size = hp.batch_size or recipe.batch_size
    hp.lr_scheduler = hp.lr_scheduler or recipe.lr_scheduler
    if not out.replay.HasField("ratio"):
        out.replay.ratio = recipe.replay_ratio
    return out


def recipe_epochs(recipe: Recipe, records: int, batch_size: int) -> int:
    """The recipe's epochs, raised so ``records`` make at least its ``min_steps`` steps."""
    steps_per_epoch = max(1, math.ceil(records / max(1, batch_size)))
    return max(recipe.num_epochs, math.ceil(recipe.min_steps / steps_per_epoch))


def fit_epochs(
    asked: trainer_pb2.JobSpec, spec: trainer_pb2.JobSpec, recipe: Recipe | None, records: int
) -> None:
    """Once the dataset's size is known: the recipe's epochs for it, unless the job asked
    for its own (``asked`` is the spec as submitted, ``spec`` the one with the recipe)."""
    if recipe is None or asked.hyperparameters.num_epochs or spec.method not in ("", "lora"):
        return
    hp = spec.hyperparameters
    hp.num_epochs = recipe_epochs(recipe, records, hp.batch_size or recipe.batch_size)


def base_recipe(base_dir: Path) -> Recipe | None:
    """The recipe for the base model at ``base_dir`` by its parameter count (from the
    safetensors headers); None when its weights cannot be read here."""
    from ftops_models.check import ModelDirError
    from ftops_models.memory import count_parameters

    try:
        return recipe_for(count_parameters(base_dir))
    except ModelDirError:
        return None


def apply_base_recipe(spec: trainer_pb2.JobSpec, base_dir: Path) -> trainer_pb2.JobSpec:
    """The spec with its base model's recipe filled in (unchanged when none applies)."""
    recipe = base_recipe(Path(base_dir))
    if recipe is None:
        return spec
    log.info("job for %s: recipe %s for unset fields", spec.adapter, recipe.name)
    return with_recipe(spec, recipe, model_type(Path(base_dir)))


def recipe_params(recipe: Recipe, model_type: str = "llama") -> TrainParams:
    """The recipe as training parameters (what a job that sets nothing trains with)."""
    spec = with_recipe(trainer_pb2.JobSpec(adapter="recipe"), recipe, model_type)
    targets = tuple(spec.lora.target_modules)
    return replace(
        TrainParams(),
        r=spec.lora.r,
        alpha=spec.lora.alpha,
        target_modules=targets or TrainParams().target_modules,
        learning_rate=spec.hyperparameters.learning_rate,
        num_epochs=spec.hyperparameters.num_epochs,
        batch_size=spec.hyperparameters.batch_size,
        lr_scheduler=spec.hyperparameters.lr_scheduler,
    )
