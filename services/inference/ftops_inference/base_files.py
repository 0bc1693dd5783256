"""What a backend without transformers in-process needs to know of the base model's
files: module shapes (for the adapter tensor checks) and the context length."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from ftops_inference.backend import ModuleShape


def read_base(model_dir: Path) -> tuple[dict[str, ModuleShape], int]:
    """Module shapes from the weights' headers (no tensor is read), so adapters for this
    base pass the same checks as with a real backend."""
    shapes: dict[str, ModuleShape] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            for key in sorted(keys):
                if not key.endswith(".weight"):
                    continue
                shape = handle.get_slice(key).get_shape()
                if len(shape) != 2:
                    continue
                module = key.removesuffix(".weight")
                bias = f"{module}.bias"
                bias_shape = handle.get_slice(bias).get_shape() if bias in keys else None
                if "embed" in module:
                    shapes[module] = ModuleShape("embedding", shape[0], shape[1])
                elif bias_shape == [shape[1]] and shape[0] != shape[1]:
                    # GPT-2's Conv1D stores its weight [in, out]: its bias says which is out.
                    shapes[module] = ModuleShape("linear", shape[0], shape[1])
                else:
                    shapes[module] = ModuleShape("linear", shape[1], shape[0])
    config_path = model_dir / "config.json"
    context = 2048
    if config_path.exists():
        context = int(json.loads(config_path.read_text()).get("max_position_embeddings") or 2048)
    return shapes, context
