"""File checks of the adapter methods other than LoRA, before anything is loaded: AdaLoRA,
IA3, prompt tuning, prefix tuning (PEFT adapters) and partial fine-tunes (the trainer's top
layers, under the base model's own parameter names). Headers and configs only, no torch:
what needs the base model itself (parameter shapes, attention geometry) the HF backend
checks when it reads the weights (``peft_methods``), still before the model changes.

Which methods a replica serves depends on its backend (``SERVED``): vLLM serves LoRA
adapters only.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from ftops_inference.backend import ModuleShape
from ftops_runtime.errors import FailedPrecondition

LORA = "LORA"
ADALORA = "ADALORA"
IA3 = "IA3"
PROMPT_TUNING = "PROMPT_TUNING"
PREFIX_TUNING = "PREFIX_TUNING"
PARTIAL = "PARTIAL"
# The trainer's names of each kind (its `method`), for messages.
METHOD_NAMES = {
    LORA: "lora",
    ADALORA: "adalora",
    IA3: "ia3",
    PROMPT_TUNING: "prompt_tuning",
    PREFIX_TUNING: "prefix_tuning",
    PARTIAL: "partial",
}
OTHER_METHODS = (ADALORA, IA3, PROMPT_TUNING, PREFIX_TUNING, PARTIAL)
SERVED: dict[str, tuple[str, ...]] = {
    "hf": (LORA, *OTHER_METHODS),
    "vllm": (LORA,),
    "echo": (LORA, *OTHER_METHODS),
}
PROMPT_KEY = "prompt_embeddings"  # PEFT's one tensor of a prompt-learning adapter
_IA3_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.ia3_l$")
_ADALORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[ABE])$")
# Virtual tokens take context from every request of the adapter.
MAX_VIRTUAL_TOKENS = 512


def adapter_kind(config: Any) -> str:
    """The config's kind: its ``peft_type`` (``PARTIAL`` for a partial fine-tune)."""
    if not isinstance(config, dict):
        return ""
    if config.get("method") == "partial":
        return PARTIAL
    return str(config.get("peft_type") or "")


def describe(kinds: Collection[str]) -> str:
    return ", ".join(METHOD_NAMES.get(k, k.lower()) for k in kinds)


def check_method_config(
    version_id: str,
    config: dict[str, Any],
    served: Collection[str],
    backend: str = "",
    max_rank: int = 256,
) -> None:
    """The config of a non-LoRA adapter: a kind this replica serves, with sane fields."""
    kind = adapter_kind(config)
    if kind not in served:
        where = f"this replica's backend ({backend})" if backend else "this replica"
        raise FailedPrecondition(
            f"version {version_id}: {where} serves {describe(served)} adapters only, "
            f"got peft_type={config.get('peft_type')!r}"
        )
    if kind == ADALORA:
        rank = config.get("init_r")
        if not isinstance(rank, int) or not 0 < rank <= max_rank:
            raise FailedPrecondition(
                f"version {version_id}: adalora init_r={rank!r} must be in [1, {max_rank}] "
                "(max_lora_rank)"
            )
    elif kind == IA3:
        for field in ("target_modules", "feedforward_modules"):
            value = config.get(field)
            if not (value is None or isinstance(value, str) or _strings(value)):
                raise FailedPrecondition(
                    f"version {version_id}: ia3 {field} is not a list of names"
                )
    elif kind in (PROMPT_TUNING, PREFIX_TUNING):
        count = config.get("num_virtual_tokens")
        if not isinstance(count, int) or not 1 <= count <= MAX_VIRTUAL_TOKENS:
            raise FailedPrecondition(
                f"version {version_id}: num_virtual_tokens={count!r} must be in "
                f"[1, {MAX_VIRTUAL_TOKENS}]"
            )
        if config.get("num_transformer_submodules") not in (None, 1):
            raise FailedPrecondition(
                f"version {version_id}: an encoder-decoder prompt-learning adapter "
                f"(num_transformer_submodules={config.get('num_transformer_submodules')}) "
                "does not fit a causal language model"
            )
    elif kind == PARTIAL:
        layers = config.get("layers")
        if not (
            isinstance(config.get("layers_module"), str)
            and isinstance(layers, list)
            and layers
            and all(isinstance(i, int) and i >= 0 for i in layers)
            and isinstance(config.get("num_hidden_layers"), int)
        ):
            raise FailedPrecondition(
                f"version {version_id}: a partial fine-tune's config needs layers_module, "
                "layers (indices) and num_hidden_layers"
            )
    else:
        raise FailedPrecondition(f"version {version_id}: adapter type {kind!r} is not served")


def check_method_tensors(
    version_id: str,
    config: dict[str, Any],
    shapes: Mapping[str, list[int]],
    base_modules: Mapping[str, ModuleShape],
    max_rank: int = 256,
) -> None:
    """The tensor names and shapes a non-LoRA adapter of this config must have."""
    kind = adapter_kind(config)
    if not shapes:
        raise FailedPrecondition(f"version {version_id}: the adapter holds no tensors")
    if kind == ADALORA:
        _check_adalora(version_id, shapes, base_modules, max_rank)
    elif kind == IA3:
        for key, shape in shapes.items():
            _check_ia3(version_id, config, key, shape, base_modules)
    elif kind in (PROMPT_TUNING, PREFIX_TUNING):
        if set(shapes) != {PROMPT_KEY}:
            raise FailedPrecondition(
                f"version {version_id}: a {METHOD_NAMES[kind]} adapter holds one tensor, "
                f"{PROMPT_KEY!r}; got {sorted(shapes)[:3]}"
            )
        shape = shapes[PROMPT_KEY]
        count = config.get("num_virtual_tokens")
        if len(shape) != 2 or shape[0] != count or shape[1] <= 0:
            raise FailedPrecondition(
                f"version {version_id}: {PROMPT_KEY} has shape {shape}, not "
                f"[num_virtual_tokens={count}, ...]"
            )
    elif kind == PARTIAL:
        prefixes = tuple(f"{config['layers_module']}.{i}." for i in config["layers"])
        for key in shapes:
            if not key.startswith(prefixes):
                raise FailedPrecondition(
                    f"version {version_id}: tensor {key!r} is outside the partial fine-tune's "
                    f"layers {config['layers']} of {config['layers_module']}"
                )


def _check_ia3(
    version_id: str,
    config: dict[str, Any],
    key: str,
    shape: list[int],
    base_modules: Mapping[str, ModuleShape],
) -> None:
    match = _IA3_KEY.match(key)
    if match is None:
        raise FailedPrecondition(f"version {version_id}: unexpected tensor {key!r} in adapter")
    name = match["module"]
    module = base_modules.get(name)
    if module is None or module.kind != "linear":
        raise FailedPrecondition(
            f"version {version_id}: tensor {key!r} targets module {name!r}, which is not a "
            "linear layer of the base model"
        )
    if ia3_feedforward(config, name):
        expected = [1, module.in_features]
    else:
        expected = [module.out_features, 1]
    if shape != expected:
        raise FailedPrecondition(
            f"version {version_id}: tensor {key!r} has shape {shape}, which does not fit "
            f"base module {name!r} (linear {module.in_features}->{module.out_features}; "
            f"expected {expected})"
        )


def _check_adalora(
    version_id: str,
    shapes: Mapping[str, list[int]],
    base_modules: Mapping[str, ModuleShape],
    max_rank: int,
) -> None:
    """Per module lora_A [r, in], lora_E [r, 1], lora_B [out, r] (r pruned per module)."""
    found: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        match = _ADALORA_KEY.match(key)
        if match is None:
            raise FailedPrecondition(f"version {version_id}: unexpected tensor {key!r} in adapter")
        found.setdefault(match["module"], {})[match["kind"]] = shape
    for name, parts in found.items():
        module = base_modules.get(name)
        if module is None or module.kind != "linear":
            raise FailedPrecondition(
                f"version {version_id}: AdaLoRA tensors target {name!r}, which is not a "
                "linear layer of the base model"
            )
        a, b, e = parts.get("A"), parts.get("B"), parts.get("E")
        rank = a[0] if a and len(a) == 2 else -1
        if (a, b, e) != ([rank, module.in_features], [module.out_features, rank], [rank, 1]):
            raise FailedPrecondition(
                f"version {version_id}: AdaLoRA tensors of {name!r} have shapes A={a}, "
                f"B={b}, E={e}, which do not fit linear {module.in_features}->"
                f"{module.out_features}"
            )
        if rank > max_rank:
            raise FailedPrecondition(
                f"version {version_id}: AdaLoRA rank {rank} of {name!r} is above this "
                f"replica's limit of {max_rank} (max_lora_rank)"
            )


def ia3_feedforward(config: Mapping[str, Any], module: str) -> bool:
    """PEFT's rule for whether IA3 scales a module's input (feed-forward) or its output:
    a string is a full-match regex, a list matches by suffix."""
    modules = config.get("feedforward_modules")
    if isinstance(modules, str):
        return re.fullmatch(modules, module) is not None
    return any(module.endswith(target) for target in modules or ())


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
