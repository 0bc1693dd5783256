"""The base model a benchmark runs on: the tiny model by default, ``smollm2`` (the real
SmolLM2-135M-Instruct, converted once into the model cache; ``ftops[smollm2]``) or any
local Hugging Face directory. Results of other models than the tiny one are written under
``<benchmark>_<model>`` so that both sets stay side by side."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

TINY = "tiny"


@dataclass(frozen=True)
class BenchModel:
    path: Path
    name: str
    tiny: bool

    def report_name(self, benchmark: str) -> str:
        return benchmark if self.tiny else f"{benchmark}_{self.name}"


def bench_model(spec: str = TINY) -> BenchModel:
    from ftops_devstack.base_model import resolve_base_model

    choice = resolve_base_model(spec)
    return BenchModel(choice.path, choice.name, choice.tiny)


def model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-model", default=TINY, help="tiny (default), smollm2 or a model directory"
    )
