"""Top-layer partial fine-tuning: the last N transformer layers train, all else is frozen.

The artifact has the same two files as a PEFT adapter, so it travels through the registry
unchanged: ``adapter_model.safetensors`` holds only those layers' tensors, under the base
model's own parameter names (``model.layers.3.mlp.down_proj.weight``), and
``adapter_config.json`` says ``"method": "partial"`` with the layer indices, where the layers
live and the base model's name. ``load_partial`` overwrites those tensors in a base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

METHOD = "partial"
PEFT_TYPE = "PARTIAL"  # PEFT's own loader refuses it instead of loading something wrong
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer layers and its module path (``model.layers`` for
    Llama): the ModuleList as long as ``config.num_hidden_layers``."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers
    ]
    if not found:
        raise ValueError(f"{type(model).__name__}: no stack of {n_layers} transformer layers found")
    # Prefer the conventional names when several lists qualify.
    found.sort(key=lambda nm: nm[0].split(".")[-1] not in ("layers", "h", "blocks"))
    return found[0]


def top_layers(num_hidden_layers: int, num_layers: int) -> list[int]:
    return list(range(num_hidden_layers - num_layers, num_hidden_layers))


def layer_keys(prefix: str, indices: list[int]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}." for i in indices)


def make_trainable(model: torch.nn.Module, prefix: str, indices: list[int]) -> None:
    """Freeze everything but the listed layers."""
    keys = layer_keys(prefix, indices)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(keys))


def build_config(
    model: torch.nn.Module, prefix: str, indices: list[int], base_model_name: str
) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "method": METHOD,
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": base_model_name,
        "model_type": getattr(config, "model_type", ""),
        "num_hidden_layers": getattr(config, "num_hidden_layers", 0),
        "layers_module": prefix,
        "layers": indices,
    }


def save(model: torch.nn.Module, config: dict[str, Any], out_dir: Path) -> None:
    """Write the listed layers' tensors and the config (safetensors + JSON only)."""
    keys = layer_keys(config["layers_module"], config["layers"])
    tensors = {
        name: param.detach().to("cpu").contiguous().clone()
        for name, param in model.named_parameters()
        if name.startswith(keys)
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(adapter_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())
    return config


def is_partial(adapter_dir: Path) -> bool:
    try:
        return read_config(adapter_dir).get("method") == METHOD
    except (OSError, ValueError):
        return False


def load_partial(base_model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Apply a partial fine-tune onto ``base_model`` in place (and return it).

    Refuses an adapter made for a different layer count, tensors outside the declared
    layers, unknown names and shape mismatches, so a wrong base fails loudly.
    """
    config = read_config(adapter_dir)
    if config.get("method") != METHOD:
        raise ValueError(
            f"{adapter_dir}: not a partial fine-tune (method={config.get('method')!r})"
        )
    prefix, layers = config["layers_module"], list(config["layers"])
    n_layers = getattr(getattr(base_model, "config", None), "num_hidden_layers", None)
    if config.get("num_hidden_layers") != n_layers:
        raise ValueError(
            f"{adapter_dir}: made for {config.get('num_hidden_layers')} layers, "
            f"the base model has {n_layers}"
        )
    tensors = load_file(str(Path(adapter_dir) / WEIGHTS_FILE))
    keys = layer_keys(prefix, layers)
    params = dict(base_model.named_parameters())
    for name, tensor in tensors.items():
        if not name.startswith(keys):
            raise ValueError(f"{adapter_dir}: tensor {name} is outside layers {layers}")
        if name not in params:
            raise ValueError(f"{adapter_dir}: the base model has no parameter {name}")
        if params[name].shape != tensor.shape:
            raise ValueError(
                f"{adapter_dir}: {name} has shape {tuple(tensor.shape)}, "
                f"the base model's is {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return base_model
