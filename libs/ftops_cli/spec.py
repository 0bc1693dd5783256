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
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftops.trainer.v1 import trainer_pb2
from ftops_cli.errors import CliError

DEFAULT_BASE_MODEL = "tiny-llama"

STR_KEYS = ("adapter", "team", "base_model", "dataset", "parent_version")
INT_KEYS = ("lora_r", "lora_alpha", "num_epochs", "batch_size", "cutoff_len", "seed", "max_steps")
FLOAT_KEYS = ("lora_dropout", "learning_rate")
LIST_KEYS = ("lora_target",)
KNOWN_KEYS = STR_KEYS + INT_KEYS + FLOAT_KEYS + LIST_KEYS


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
            raise CliError(f"{where}unknown key '{key}' (known: {', '.join(KNOWN_KEYS)})")
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
    for required in ("adapter", "dataset"):
        if required not in values:
            raise CliError(f"missing '{required}' (--{required} or '{required}:' in --spec)")
    dataset = Path(values["dataset"])
    try:
        data = dataset.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read dataset {dataset}: {exc.strerror or exc}") from exc
    lora = trainer_pb2.LoraConfig(
        r=values.get("lora_r", 0),
        alpha=values.get("lora_alpha", 0),
        dropout=values.get("lora_dropout", 0.0),
        target_modules=values.get("lora_target", []),
    )
    hyper = trainer_pb2.Hyperparameters(
        learning_rate=values.get("learning_rate", 0.0),
        num_epochs=values.get("num_epochs", 0),
        batch_size=values.get("batch_size", 0),
        cutoff_len=values.get("cutoff_len", 0),
        seed=values.get("seed", 0),
        max_steps=values.get("max_steps", 0),
    )
    return trainer_pb2.JobSpec(
        adapter=values["adapter"],
        team=values.get("team", ""),
        base_model=values.get("base_model", DEFAULT_BASE_MODEL),
        parent_version_id=values.get("parent_version", ""),
        dataset_jsonl=data,
        lora=lora,
        hyperparameters=hyper,
    )
