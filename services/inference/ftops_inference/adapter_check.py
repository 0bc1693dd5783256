"""Checks of an adapter artifact before anything is loaded: which files may be in it,
whether its LoRA tensors fit the base model and the replica's rank limit, and whether their
values are finite and of a sane magnitude. Tensors are read through safetensors only;
nothing is ever unpickled. The other methods (AdaLoRA, IA3, prompt and prefix tuning,
partial fine-tunes) are checked by ``adapter_methods``, where the replica's backend serves
them."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ftops_inference.adapter_methods import (
    LORA,
    OTHER_METHODS,
    SERVED,
    adapter_kind,
    check_method_config,
    check_method_tensors,
)
from ftops_inference.backend import ModuleShape
from ftops_runtime.errors import FailedPrecondition

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What an adapter consists of, and all a backend reads: any other name is refused.
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# PEFT saves tensors as "<prefix><module>.<kind>" with the adapter name removed.
PEFT_PREFIX = "base_model.model."
_TENSOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias"
    r"|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$"
)


@dataclass(frozen=True)
class AdapterLimits:
    """What a replica serves: LoRA ranks up to ``max_rank`` (a rank costs every batch that
    uses the adapter, and memory), and weights whose magnitude stays within
    ``max_abs_weight`` (a trained LoRA's are far below 1; 3e38 is an attack or a diverged
    run, and its answers would be nonsense)."""

    max_rank: int = 256
    max_abs_weight: float = 1e4
    # The adapter kinds (peft_type) the replica's backend serves, and that backend.
    methods: tuple[str, ...] = SERVED["hf"]
    backend: str = "hf"


def check_file_names(version_id: str, paths: Iterable[str]) -> None:
    """Exactly adapter_config.json and adapter_model.safetensors, by name: a pickle, a
    near-miss (``adapter_model.bin.``) or anything else is refused before it is even
    downloaded, and no name can escape the adapter dir."""
    names = list(paths)
    for name in names:
        if name not in ADAPTER_FILES:
            raise FailedPrecondition(
                f"version {version_id}: artifact file {name!r} refused; an adapter consists "
                f"of {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} only (safetensors, never pickles)"
            )
    for required in ADAPTER_FILES:
        if required not in names:
            raise FailedPrecondition(f"version {version_id}: artifact has no {required}")


def check_adapter_config(
    version_id: str, adapter_dir: Path, limits: AdapterLimits | None = None
) -> None:
    limits = limits or AdapterLimits()
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except OSError as exc:
        raise FailedPrecondition(
            f"version {version_id}: {ADAPTER_CONFIG} cannot be read ({exc.strerror})"
        ) from exc
    except ValueError as exc:
        raise FailedPrecondition(
            f"version {version_id}: {ADAPTER_CONFIG} is not valid JSON: {exc}"
        ) from exc
    if not isinstance(config, dict):
        raise FailedPrecondition(f"version {version_id}: {ADAPTER_CONFIG} is not an object")
    if adapter_kind(config) != LORA:
        check_method_config(
            version_id, config, limits.methods, limits.backend, max_rank=limits.max_rank
        )
        return
    # PEFT builds its layers at the config's ranks before the tensors are read.
    pattern = config.get("rank_pattern")
    ranks = {"r": config.get("r")} | (pattern if isinstance(pattern, dict) else {})
    for where, rank in ranks.items():
        if isinstance(rank, int) and rank > limits.max_rank:
            raise FailedPrecondition(
                f"version {version_id}: {ADAPTER_CONFIG} asks for LoRA rank {rank} "
                f"({where}), above this replica's limit of {limits.max_rank} (max_lora_rank)"
            )


def check_tensors(
    version_id: str,
    adapter_dir: Path,
    base_modules: Mapping[str, ModuleShape],
    limits: AdapterLimits | None = None,
) -> None:
    """Every tensor must be a LoRA matrix of a module that exists in the base with a
    shape that fits it, of a rank within the limit; A and B of one module must agree on
    the rank. Reads the header only."""
    limits = limits or AdapterLimits()
    ranks: dict[str, dict[str, int]] = {}
    shapes = _read_shapes(version_id, adapter_dir / ADAPTER_WEIGHTS)
    config = _read_config(adapter_dir)
    if adapter_kind(config) in OTHER_METHODS:
        check_method_tensors(version_id, config, shapes, base_modules, limits.max_rank)
        return
    for key, shape in shapes.items():
        module, kind, rank = _check_tensor(version_id, key, shape, base_modules)
        if rank > limits.max_rank:
            raise FailedPrecondition(
                f"version {version_id}: tensor {key!r} has LoRA rank {rank}, above this "
                f"replica's limit of {limits.max_rank} (max_lora_rank)"
            )
        ranks.setdefault(module, {})[kind] = rank
    if not ranks:
        raise FailedPrecondition(f"version {version_id}: the adapter holds no LoRA tensors")
    for module, by_kind in ranks.items():
        a = by_kind.get("A")
        b = by_kind.get("B")
        if a is None or b is None or a != b:
            raise FailedPrecondition(
                f"version {version_id}: LoRA A/B of {module} are missing or disagree on rank"
            )


def check_tensor_values(
    version_id: str, adapter_dir: Path, limits: AdapterLimits | None = None
) -> None:
    """Every value finite and within the magnitude limit. One tensor in memory at a time;
    the first offending tensor is named."""
    limits = limits or AdapterLimits()
    with _open(version_id, adapter_dir / ADAPTER_WEIGHTS) as handle:
        for key in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(key)
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            # max() propagates NaN, and Inf is its own maximum: one pass finds both.
            peak = float(tensor.abs().max())
            if not math.isfinite(peak):
                raise FailedPrecondition(
                    f"version {version_id}: tensor {key!r} holds non-finite values (NaN or "
                    "Inf); the adapter would answer nonsense"
                )
            if peak > limits.max_abs_weight:
                raise FailedPrecondition(
                    f"version {version_id}: tensor {key!r} holds values up to {peak:.3g}, "
                    f"beyond the limit of {limits.max_abs_weight:g} (max_adapter_weight)"
                )


def _read_config(adapter_dir: Path) -> Any:
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return None  # check_adapter_config says why; LoRA's checks apply here


def _open(version_id: str, path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        # safetensors' messages name no path; the file's own name is enough.
        raise FailedPrecondition(
            f"version {version_id}: {path.name} is not a valid safetensors file: {exc}"
        ) from exc


def _read_shapes(version_id: str, path: Path) -> dict[str, list[int]]:
    with _open(version_id, path) as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def _check_tensor(
    version_id: str, key: str, shape: list[int], base_modules: Mapping[str, ModuleShape]
) -> tuple[str, str, int]:
    name = key.removeprefix(PEFT_PREFIX)
    match = _TENSOR.match(name)
    if match is None:
        raise FailedPrecondition(f"version {version_id}: unexpected tensor {key!r} in adapter")
    module_name, kind = match["module"], match["kind"]
    module = base_modules.get(module_name)
    if module is None:
        raise FailedPrecondition(
            f"version {version_id}: tensor {key!r} targets module {module_name!r}, "
            "which the base model does not have"
        )

    def bad() -> FailedPrecondition:
        return FailedPrecondition(
            f"version {version_id}: tensor {key!r} has shape {shape}, which does not fit "
            f"base module {module_name!r} ({module.kind} {module.in_features}->"
            f"{module.out_features})"
        )

    expected_kind = "embedding" if kind.startswith("lora_embedding") else "linear"
    if module.kind != expected_kind:
        raise bad()
    if kind in ("lora_B.bias", "lora_magnitude_vector"):  # one value per output (DoRA)
        if expected_kind != "linear" or shape != [module.out_features]:
            raise bad()
        return module_name, kind, 0
    if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
        raise bad()
    if kind in ("lora_A.weight", "lora_embedding_A"):
        if shape[1] != module.in_features:
            raise bad()
        return module_name, "A", shape[0]
    if shape[0] != module.out_features:
        raise bad()
    return module_name, "B", shape[1]
