"""Training specs: a YAML file (keys close to LLaMA-Factory / Axolotl) and/or flags,
validated into a ``trainer.v1.JobSpec``.

    adapter: support-bot          # required
    dataset: data/new.jsonl       # required; relative to the spec file; sent inline
    base_model: tiny-llama
    parent_version: ver_...       # train incrementally from this version
    lora_r: 8
    lora_alpha: 16
    lora_dropout: 0.05
    lora_target: [q_proj, v_proj] # or "q_proj,v_proj"
    learning_rate: 2.0e-4
    num_epochs: 3
    batch_size: 4
    cutoff_len: 256
    seed: 42
    max_steps: 30
    finetuning_type: lora         # lora | adalora | ia3 | prompt_tuning | prefix_tuning
                                  # | partial | qlora  (alias: method)
    use_dora: false
    use_rslora: false
    num_virtual_tokens: 8         # prompt / prefix tuning
    num_layers_trainable: 2       # partial fine-tuning: top N layers
    lr_scheduler_type: cosine     # cosine | linear | constant
    warmup_ratio: 0.1
    gradient_accumulation_steps: 2
    max_grad_norm: 1.0
    mixed_precision: auto         # auto | no | bf16 | fp16
    save_steps: 50                # checkpoint every N steps (resumable)
    early_stopping_patience: 3
    eval_steps: 20
    regularization: none          # none | l2 | ewc (towards the parent adapter)
    regularization_weight: 0.1
    world_size: 2                 # data-parallel worker processes (one per GPU on CUDA)
    nodes: 1                      # trainer replicas (machines), each with world_size workers
    parallelism: ddp              # ddp | fsdp (shard the frozen base over the workers)
    train_on_prompt: false
    overlong: truncate            # truncate | refuse
    near_dup_threshold: 0.8
    quality_threshold: 0.5
    balance_targets: {faq: 0.5, orders: 0.5}
    decay_half_life_days: 30
    replay_ratio: 0.1             # share of the lineage's earlier data mixed in
    replay_capacity: 2000
    min_retention: 0.95           # evaluation gate
    max_new_loss_ratio: 1.0
    gate: true                    # false: measure, never refuse
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftops.trainer.v1 import trainer_pb2
from ftops_cli.errors import CliError

DEFAULT_BASE_MODEL = "tiny-llama"
# Keys a spec must have, with the `ftops train` flag that gives each.
REQUIRED_KEYS = {"adapter": "--adapter", "dataset": "--data"}

STR_KEYS = (
    "adapter",
    "team",
    "base_model",
    "dataset",
    "parent_version",
    "finetuning_type",
    "method",
    "lr_scheduler_type",
    "mixed_precision",
    "regularization",
    "overlong",
    "parallelism",
)
INT_KEYS = (
    "lora_r",
    "lora_alpha",
    "num_epochs",
    "batch_size",
    "cutoff_len",
    "seed",
    "max_steps",
    "num_virtual_tokens",
    "num_layers_trainable",
    "gradient_accumulation_steps",
    "save_steps",
    "early_stopping_patience",
    "eval_steps",
    "world_size",
    "nodes",
    "replay_capacity",
    "target_r",
)
FLOAT_KEYS = (
    "lora_dropout",
    "learning_rate",
    "warmup_ratio",
    "max_grad_norm",
    "regularization_weight",
    "near_dup_threshold",
    "quality_threshold",
    "decay_half_life_days",
    "replay_ratio",
    "min_retention",
    "max_new_loss_ratio",
)
BOOL_KEYS = ("use_dora", "use_rslora", "train_on_prompt", "gate")
MAP_KEYS = ("balance_targets",)
LIST_KEYS = ("lora_target",)
KNOWN_KEYS = STR_KEYS + INT_KEYS + FLOAT_KEYS + BOOL_KEYS + MAP_KEYS + LIST_KEYS


def _check(key: str, value: Any, source: str) -> Any:
    where = f"{source}: " if source else ""
    if key in STR_KEYS:
        if not isinstance(value, str) or not value.strip():
            raise CliError(f"{where}'{key}' must be a non-empty string, got {value!r}")
        return value.strip()
    if key in INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CliError(f"{where}'{key}' must be a non-negative integer, got {value!r}")
        return value
    if key in FLOAT_KEYS:
        # YAML 1.1 reads 2e-4 (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise CliError(f"{where}'{key}' must be a non-negative number, got {value!r}")
        return float(value)
    if key in BOOL_KEYS:
        if not isinstance(value, bool):
            raise CliError(f"{where}'{key}' must be true or false, got {value!r}")
        return value
    if key in MAP_KEYS:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
            for k, v in value.items()
        ):
            raise CliError(f"{where}'{key}' must map names to non-negative numbers, got {value!r}")
        return {k: float(v) for k, v in value.items()}
    # lora_target: a list of module names or one comma-separated string
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
        raise CliError(
            f"{where}'{key}' must be a list of module names or a comma-separated string, "
            f"got {value!r}"
        )
    return [i.strip() for i in items]


def validate(values: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """Known keys with the right types; ``None`` values are dropped (flag not given)."""
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in KNOWN_KEYS:
            where = f"{source}: " if source else ""
            close = difflib.get_close_matches(str(key), KNOWN_KEYS, n=3)
            hint = (
                f"did you mean {' or '.join(repr(k) for k in close)}?"
                if close
                else f"known: {', '.join(KNOWN_KEYS)}"
            )
            raise CliError(f"{where}unknown key '{key}' ({hint}; docs/training.md lists them)")
        if value is not None:
            checked[key] = _check(key, value, source)
    return checked


def load_spec_file(path: Path) -> dict[str, Any]:
    """The spec file's values, validated; dataset made relative to the file's folder."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read spec {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise CliError(f"{path}: invalid YAML{line}: {problem}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CliError(f"{path}: the spec must be a mapping of keys to values")
    values = validate(data, str(path))
    if "dataset" in values:
        values["dataset"] = str(path.parent / values["dataset"])
    return values


def build_job_spec(values: Mapping[str, Any]) -> trainer_pb2.JobSpec:
    """A JobSpec from validated values; reads the dataset file into the request."""
    for required, flag in REQUIRED_KEYS.items():
        if required not in values:
            raise CliError(f"missing '{required}' ({flag} or '{required}:' in --spec)")
    dataset = Path(values["dataset"])
    try:
        data = dataset.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read dataset {dataset}: {exc.strerror or exc}") from exc
    if "method" in values and "finetuning_type" in values:
        raise CliError("give 'finetuning_type' or its alias 'method', not both")
    lora = trainer_pb2.LoraConfig(
        r=values.get("lora_r", 0),
        alpha=values.get("lora_alpha", 0),
        dropout=values.get("lora_dropout", 0.0),
        target_modules=values.get("lora_target", []),
        use_dora=values.get("use_dora", False),
        use_rslora=values.get("use_rslora", False),
        target_r=values.get("target_r", 0),
        num_virtual_tokens=values.get("num_virtual_tokens", 0),
        num_layers=values.get("num_layers_trainable", 0),
    )
    hyper = trainer_pb2.Hyperparameters(
        learning_rate=values.get("learning_rate", 0.0),
        num_epochs=values.get("num_epochs", 0),
        batch_size=values.get("batch_size", 0),
        cutoff_len=values.get("cutoff_len", 0),
        seed=values.get("seed", 0),
        max_steps=values.get("max_steps", 0),
        lr_scheduler=values.get("lr_scheduler_type", ""),
        grad_accum_steps=values.get("gradient_accumulation_steps", 0),
        mixed_precision=values.get("mixed_precision", ""),
        checkpoint_every=values.get("save_steps", 0),
        early_stopping_patience=values.get("early_stopping_patience", 0),
        eval_every=values.get("eval_steps", 0),
        regularization=values.get("regularization", ""),
        regularization_weight=values.get("regularization_weight", 0.0),
        world_size=values.get("world_size", 0),
        nodes=values.get("nodes", 0),
        parallelism=values.get("parallelism", ""),
    )
    if "warmup_ratio" in values:
        hyper.warmup_ratio = values["warmup_ratio"]
    if "max_grad_norm" in values:
        hyper.max_grad_norm = values["max_grad_norm"]
    data_config = trainer_pb2.DataConfig(
        train_on_prompt=values.get("train_on_prompt", False),
        overlong=values.get("overlong", ""),
        balance_targets=values.get("balance_targets", {}),
        decay_half_life_days=values.get("decay_half_life_days", 0.0),
    )
    if "near_dup_threshold" in values:
        data_config.near_dup_threshold = values["near_dup_threshold"]
    if "quality_threshold" in values:
        data_config.quality_threshold = values["quality_threshold"]
    replay = trainer_pb2.ReplayConfig(capacity=values.get("replay_capacity", 0))
    if "replay_ratio" in values:
        replay.ratio = values["replay_ratio"]
    gate = trainer_pb2.GateConfig(disabled=not values.get("gate", True))
    if "min_retention" in values:
        gate.min_retention = values["min_retention"]
    if "max_new_loss_ratio" in values:
        gate.max_new_loss_ratio = values["max_new_loss_ratio"]
    return trainer_pb2.JobSpec(
        adapter=values["adapter"],
        team=values.get("team", ""),
        base_model=values.get("base_model", DEFAULT_BASE_MODEL),
        parent_version_id=values.get("parent_version", ""),
        dataset_jsonl=data,
        method=values.get("finetuning_type", values.get("method", "")),
        lora=lora,
        hyperparameters=hyper,
        data=data_config,
        replay=replay,
        gate=gate,
    )
