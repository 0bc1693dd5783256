"""Where converted models live: ``FTOPS_MODEL_CACHE``, else ``$XDG_CACHE_HOME/ftops``
(``~/.cache/ftops``), beside the tiny model's builds."""

from __future__ import annotations

import os
from pathlib import Path


def model_cache_dir() -> Path:
    env = os.environ.get("FTOPS_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ftops"
