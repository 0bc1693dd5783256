"""sha256 helpers for artifacts and base-model fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1024 * 1024
# Files that define a model's weights and shape; tokenizer and docs do not change outputs
# of an adapter's matrices, but the tokenizer does change token ids, so it is included.
FINGERPRINT_PATTERNS = ("config.json", "*.safetensors", "tokenizer.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_id(files: Iterable[tuple[str, str, int]]) -> str:
    """Content id of a set of (path, sha256, size): the same files give the same id."""
    lines = sorted(f"{p}\t{h}\t{s}" for p, h, s in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a base model directory: its config, weights and tokenizer files.

    An adapter trained on one base must never be loaded onto another; comparing this
    fingerprint catches it even when the directory was renamed or copied.
    """
    entries: list[tuple[str, str, int]] = []
    for pattern in FINGERPRINT_PATTERNS:
        for path in sorted(model_dir.glob(pattern)):
            entries.append((path.name, sha256_file(path), path.stat().st_size))
    if not entries:
        raise FileNotFoundError(f"{model_dir} holds no config.json or *.safetensors")
    return manifest_id(entries)
