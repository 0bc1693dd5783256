"""The trainer's data pipeline: cleaning, quality scoring, exact and near-duplicate
removal, category balancing and time-decay weights, each reporting records in and out.

Runs between ``load_dataset`` and ``tokenize_all``; deterministic for a config (seed
included). Every stage appears in the result, a skipped one (disabled, or balancing
without a target, decay without a half-life) with ``details == {"skipped": 1.0}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ftops_trainer.dataset import Record
from ftops_trainer.pipeline.balance import balance
from ftops_trainer.pipeline.cleaning import clean
from ftops_trainer.pipeline.config import (
    BalanceConfig,
    CleaningConfig,
    DecayConfig,
    ExactDedupConfig,
    NearDedupConfig,
    PipelineConfig,
    QualityConfig,
)
from ftops_trainer.pipeline.decay import decay
from ftops_trainer.pipeline.dedup import exact_dedup, near_dedup
from ftops_trainer.pipeline.quality import filter_quality
from ftops_trainer.pipeline.report import PipelineResult, StageReport

__all__ = [
    "BalanceConfig",
    "CleaningConfig",
    "DecayConfig",
    "ExactDedupConfig",
    "NearDedupConfig",
    "PipelineConfig",
    "PipelineResult",
    "QualityConfig",
    "StageReport",
    "run_pipeline",
]

StageFn = Callable[[list[Record]], tuple[list[Record], dict[str, float]]]


def _stages(config: PipelineConfig) -> list[tuple[str, StageFn | None]]:
    """Each stage in order, None where it is skipped."""
    target, half_life = config.balance.target, config.decay.half_life_s
    stages: list[tuple[str, bool, StageFn]] = [
        ("cleaning", config.cleaning.enabled, clean),
        ("quality", config.quality.enabled, lambda rs: filter_quality(rs, config.quality)),
        ("exact_dedup", config.exact_dedup.enabled, exact_dedup),
        (
            "near_dedup",
            config.near_dedup.enabled,
            lambda rs: near_dedup(rs, config.near_dedup, config.seed),
        ),
        (
            "balance",
            config.balance.enabled and target is not None,
            lambda rs: balance(rs, target or {}, config.seed),
        ),
        (
            "decay",
            config.decay.enabled and half_life is not None,
            lambda rs: decay(rs, half_life or 1.0),
        ),
    ]
    return [(name, fn if on else None) for name, on, fn in stages]


def run_pipeline(records: Sequence[Record], config: PipelineConfig | None = None) -> PipelineResult:
    config = config or PipelineConfig()
    current = list(records)
    reports: list[StageReport] = []
    for name, stage in _stages(config):
        started = time.perf_counter()
        out, details = (current, {"skipped": 1.0}) if stage is None else stage(current)
        seconds = time.perf_counter() - started
        reports.append(StageReport(name, len(current), len(out), details, seconds))
        current = out
    return PipelineResult(records=current, stages=reports)
