"""ftops_tinymodel: a tiny, locally built Llama for dev and tests (no model hub needed).

Usage::

    from ftops_tinymodel import build, retention_set, new_facts, exact_match
    model_dir = build()  # cached; ~30 s on 2 CPU cores the first time
"""

from __future__ import annotations

from .builder import BUILD_VERSION, METADATA_FILE, build, cache_key, default_dir, read_metadata
from .corpus import new_facts, retention_set, train_texts
from .evaluate import evaluate_new_facts, evaluate_retention, load
from .model import TrainConfig, completion_loss, exact_match

__all__ = [
    "BUILD_VERSION",
    "METADATA_FILE",
    "TrainConfig",
    "build",
    "cache_key",
    "completion_loss",
    "default_dir",
    "evaluate_new_facts",
    "evaluate_retention",
    "exact_match",
    "load",
    "new_facts",
    "read_metadata",
    "retention_set",
    "train_texts",
]
