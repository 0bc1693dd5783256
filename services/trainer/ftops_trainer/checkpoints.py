"""Resumable training checkpoints, written without pickles.

``torch.save`` of an optimizer state dict is a pickle (and loading one runs code), so the
state is split: every tensor goes to ``tensors.safetensors`` under a prefixed name, the
rest (step, losses, optimizer hyperparameters, Python RNG state, ...) to ``state.json``.
A checkpoint is written into a temporary directory and renamed into place, so a killed
writer never leaves a half checkpoint that ``latest`` would pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT = 1
_NAME = re.compile(r"step-(\d+)")


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """The optimizer's state dict as (tensors, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        state[str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                state[str(index)][key] = value
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: Any
) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = state
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: Any) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda/")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _flatten(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        f"{group}/{name}": tensor.detach().to("cpu").contiguous().clone()
        for group, tensors in groups.items()
        for name, tensor in tensors.items()
    }


def _unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = tensor
    return groups


def save(
    directory: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically; keep only the newest ``keep``.

    ``tensors`` maps a group (``model``, ``optimizer``, ``rng`` ...) to named tensors.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):  # a writer killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    save_file(_flatten(tensors), str(tmp / TENSORS_FILE))
    (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT, "step": step, **state}))
    for path in (tmp / TENSORS_FILE, tmp / STATE_FILE):
        with path.open("rb") as f:
            os.fsync(f.fileno())
    final = directory / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file() and (p / TENSORS_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(directory: Path) -> Path | None:
    found = complete(directory)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    state: dict[str, Any] = json.loads((path / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r} is not {FORMAT}")
    return _unflatten(load_file(str(path / TENSORS_FILE))), state
