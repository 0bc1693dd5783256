"""Static checks of an adapter artifact before anything is loaded: which files may be in
it, and whether its LoRA tensors fit the base model. Only safetensors headers are read;
nothing is ever unpickled."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors import safe_open

from ftops_inference.backend import ModuleShape
from ftops_runtime.errors import FailedPrecondition

ADAPTER_CONFIG = "adapter_config.json"
# PEFT saves tensors as "<prefix><module>.<kind>" with the adapter name removed.
PEFT_PREFIX = "base_model.model."
_TENSOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias"
    r"|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$"
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_file_names(version_id: str, paths: Iterable[str]) -> None:
    """Only adapter_config.json and *.safetensors, as plain names: a pickle (.bin, .pt)
    is refused before it is even downloaded, and no name can escape the adapter dir."""
    names = list(paths)
    for name in names:
        if not _SAFE_NAME.match(name) or ".." in name:
            raise FailedPrecondition(f"version {version_id}: artifact file name {name!r} refused")
        if name != ADAPTER_CONFIG and not name.endswith(".safetensors"):
            raise FailedPrecondition(
                f"version {version_id}: artifact file {name!r} refused; only "
                f"{ADAPTER_CONFIG} and *.safetensors are loaded (never pickles)"
            )
    if ADAPTER_CONFIG not in names:
        raise FailedPrecondition(f"version {version_id}: artifact has no {ADAPTER_CONFIG}")
    if not any(n.endswith(".safetensors") for n in names):
        raise FailedPrecondition(f"version {version_id}: artifact has no .safetensors file")


def check_adapter_config(version_id: str, adapter_dir: Path) -> None:
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(
            f"version {version_id}: {ADAPTER_CONFIG} is not valid JSON: {exc}"
        ) from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise FailedPrecondition(
            f"version {version_id}: only LoRA adapters are served, got peft_type={kind!r}"
        )


def check_tensors(
    version_id: str, adapter_dir: Path, base_modules: Mapping[str, ModuleShape]
) -> None:
    """Every tensor must be a LoRA matrix of a module that exists in the base with a
    shape that fits it; A and B of one module must agree on the rank."""
    ranks: dict[str, dict[str, int]] = {}
    files = sorted(adapter_dir.glob("*.safetensors"))
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except Exception as exc:
            raise FailedPrecondition(
                f"version {version_id}: {path.name} is not a valid safetensors file: {exc}"
            ) from exc
        for key, shape in shapes.items():
            module, kind, rank = _check_tensor(version_id, key, shape, base_modules)
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
