"""Default target modules per architecture, for the methods that wrap named modules (LoRA,
AdaLoRA, QLoRA, IA3) when a job names none.

In this order, the first that fits the base model:

1. the Llama-family attention projections ``q_proj, k_proj, v_proj, o_proj``, where the
   model has all four as linear layers (Llama, Qwen2, Mistral, Gemma, ...): the default
   the project's recipes are tuned on, kept as it was;
2. PEFT's default for the model type and method
   (``TRANSFORMERS_MODELS_TO_{LORA,ADALORA,IA3}_TARGET_MODULES_MAPPING``: ``c_attn`` for
   GPT-2, ``query_key_value`` for GPT-NeoX and Falcon, ...), where every name it lists is
   a linear layer of the model;
3. every linear layer (``nn.Linear`` and transformers' ``Conv1D``) but the output head,
   as PEFT's ``all-linear`` picks them (Phi-3's fused ``qkv_proj`` and ``gate_up_proj``,
   and any architecture PEFT does not know), by their short names where a short name
   matches linear layers only, else by full name.

A base-size recipe that asks for every linear layer (``recipes.py``: LoRA jobs on bases of
50M parameters and more) gets rule 3 on any architecture; on the Llama family it names the
same modules itself.

The result is a concrete list of names: the job record and the adapter's config show what
was trained, and inference checks the same names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LLAMA_ATTENTION",
    "default_target_modules",
    "default_targets_for",
    "linear_layers",
    "meta_model",
]

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# The methods with targets; QLoRA trains a LoRA adapter.
_MAPPINGS = {
    "lora": "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "qlora": "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "adalora": "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
    "ia3": "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
}


def meta_model(config: Any) -> torch.nn.Module:
    """The causal LM of ``config`` on the meta device: every module, no weights."""
    from transformers import AutoModelForCausalLM

    auto: Any = AutoModelForCausalLM  # from_config is untyped
    with torch.device("meta"):
        model: torch.nn.Module = auto.from_config(config)
    return model


def _matches(name: str, target: str) -> bool:
    # PEFT's rule for a list of names: the full name or its dotted suffix.
    return name == target or name.endswith("." + target)


def linear_layers(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], set[str]]:
    """The model's linear layers (``nn.Linear``, ``Conv1D``) but its output head, by name,
    and the names of the output head (what PEFT's ``all-linear`` leaves out)."""
    from transformers.pytorch_utils import Conv1D

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    body: dict[str, torch.nn.Module] = {}
    heads: set[str] = set()
    for name, module in model.named_modules():
        if module is head:
            heads.add(name)
        elif isinstance(module, torch.nn.Linear | Conv1D):
            body[name] = module
    return body, heads


def _fits(targets: Iterable[str], names: Iterable[str], body: Mapping[str, Any]) -> bool:
    """Every target matches some module, and only linear layers of the body."""
    all_names = list(names)
    for target in targets:
        hits = [n for n in all_names if _matches(n, target)]
        if not hits or any(n not in body for n in hits):
            return False
    return True


def default_target_modules(
    method: str, model: torch.nn.Module, *, all_linear: bool = False
) -> tuple[str, ...]:
    """The modules ``method`` adapts in ``model`` when the job names none (see the module
    docstring); with ``all_linear`` rule 3 directly (a recipe that asks for every linear
    layer). Empty only for a model without linear layers."""
    body, _ = linear_layers(model)
    names = [name for name, _ in model.named_modules()]
    if all_linear:
        return _all_linear(names, body)
    if _fits(LLAMA_ATTENTION, names, body):
        return LLAMA_ATTENTION
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or "")
    mapping_name = _MAPPINGS.get(method)
    if mapping_name and model_type:
        from peft.utils import constants

        mapping: Mapping[str, list[str]] = getattr(constants, mapping_name, {})
        known = tuple(mapping.get(model_type) or ())
        if known and _fits(known, names, body):
            return known
    return _all_linear(names, body)


def _all_linear(names: list[str], body: Mapping[str, torch.nn.Module]) -> tuple[str, ...]:
    targets: dict[str, None] = {}  # in model order
    for name in body:
        short = name.rsplit(".", 1)[-1]
        if _fits([short], names, body):
            targets[short] = None
        else:  # the short name also matches the head or a non-linear module
            targets[name] = None
    return tuple(targets)


def default_targets_for(
    method: str, base_dir: Path, *, all_linear: bool = False
) -> tuple[str, ...]:
    """What ``default_target_modules`` gives on the base model in ``base_dir``, from its
    config alone; empty for a method without targets or where the config is not there
    (training then resolves the default on the loaded model)."""
    if method not in _MAPPINGS or not (base_dir / "config.json").is_file():
        return ()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base_dir))
    except (OSError, ValueError):
        return ()
    return default_target_modules(method, meta_model(config), all_linear=all_linear)
