"""What a base model directory must hold for every service to load it: refused up front
with the reason, not halfway through a service's start."""

from __future__ import annotations

import json
from pathlib import Path

from ftops_runtime.errors import InvalidArgument

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class ModelDirError(InvalidArgument):
    """The directory is not a loadable Hugging Face model; the message says why."""


def check_model_dir(path: Path) -> Path:
    """The directory, resolved, once it has a config, safetensors weights and a tokenizer."""
    model_dir = Path(path).expanduser().resolve()
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir} is not a directory")
    problems = []
    try:
        config = json.loads((model_dir / "config.json").read_text())
        if not isinstance(config, dict) or "model_type" not in config:
            problems.append("config.json names no model_type")
    except (OSError, ValueError) as exc:
        problems.append(f"no readable config.json ({exc.__class__.__name__})")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"no safetensors weights ({' or '.join(WEIGHT_FILES)})")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer ({', '.join(TOKENIZER_FILES)})")
    if problems:
        raise ModelDirError(f"{model_dir} is not a usable base model: " + "; ".join(problems))
    return model_dir
