"""The evaluation gate: a candidate adapter is released only if it learned what it was
given (exact match on its own training records), kept what its parent knew (retention) and
did not get worse on the new data (held-out loss). Pure logic over EvalResults, so it is
tested without a model; the scores come from ``evaluation``.

Each figure answers its own question. A held-out split of unseen facts cannot show that
facts were learned (a fact not trained on is not known), only that the data's form and
style were; the training records themselves can: a version whose greedy answers to its
own training prompts are not its completions did not learn them.

"Parent" is the parent adapter, or the bare base model for a lineage's first job.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ftops_trainer.evaluation import EvalResult, retention

T = TypeVar("T")

# Below this many records a holdout would be one or two examples of noise (and records
# the adapter never learns): the new-data score is then taken on the training set.
MIN_RECORDS_FOR_HOLDOUT = 10


# The share of its own training records a version must answer exactly (greedy) by
# default: the tiny model's demo reaches 1.0 and a version that learned nothing 0.
DEFAULT_MIN_LEARNED = 0.9


@dataclass(frozen=True)
class GateConfig:
    min_retention: float = 0.95  # score_after / score_before on the retention set
    max_new_loss_ratio: float = 1.0  # held-out new-data loss vs the parent's: no worse
    enabled: bool = True  # False: still measured and reported, never blocks
    # Exact match on the training records (token accuracy when none has a short target).
    min_learned: float = DEFAULT_MIN_LEARNED


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str]  # why it failed (empty when passed); also filled when disabled
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)  # caveats: skipped checks, no holdout


@dataclass(frozen=True)
class HoldoutSplit(Generic[T]):
    train: list[T]
    holdout: list[T]
    holdout_is_training: bool  # too few records: holdout is the training set itself


def split_holdout(
    records: Sequence[T],
    fraction: float = 0.1,
    *,
    min_holdout: int = 1,
    min_records: int = MIN_RECORDS_FOR_HOLDOUT,
    seed: int = 0,
) -> HoldoutSplit[T]:
    """A seeded split into training and held-out records, each in the input's order.

    The holdout has ``max(min_holdout, round(fraction * n))`` records and always leaves
    at least one to train on; with fewer than ``min_records`` records nothing is held out
    and the holdout *is* the training set (``holdout_is_training``).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    n = len(records)
    if n < max(2, min_records):
        return HoldoutSplit(list(records), list(records), holdout_is_training=True)
    size = min(n - 1, max(min_holdout, round(fraction * n)))
    held = set(random.Random(seed).sample(range(n), size))
    return HoldoutSplit(
        train=[r for i, r in enumerate(records) if i not in held],
        holdout=[r for i, r in enumerate(records) if i in held],
        holdout_is_training=False,
    )


def sample_records(records: Sequence[T], size: int, seed: int = 0) -> list[T]:
    """At most ``size`` of the records, a seeded choice kept in the input's order."""
    if len(records) <= size:
        return list(records)
    chosen = set(random.Random(seed).sample(range(len(records)), size))
    return [r for i, r in enumerate(records) if i in chosen]


def _check_retention(
    config: GateConfig, before: EvalResult, after: EvalResult, metrics: dict[str, float]
) -> str | None:
    metrics.update(before.metrics("retention_before"))
    metrics.update(after.metrics("retention_after"))
    if math.isnan(before.loss) or math.isnan(after.loss):
        return "retention could not be measured: no retention record fits cutoff_len"
    r = retention(before, after)
    metrics["retention"] = r.value
    metrics["retention_loss_ratio"] = r.loss_ratio
    metrics["retention_on_exact_match"] = float(r.basis == "exact_match")
    if r.exact_match_ratio is not None:
        metrics["retention_exact_match_ratio"] = r.exact_match_ratio
    if r.value < config.min_retention:
        what = "exact match" if r.basis == "exact_match" else "exp(-loss)"
        return (
            f"retention {r.value:.3f} < {config.min_retention:.3f} on {r.records} "
            f"retention records ({what} after/before)"
        )
    return None


def _check_base_retention(
    config: GateConfig, base: EvalResult, after: EvalResult, metrics: dict[str, float]
) -> str | None:
    if math.isnan(base.loss) or math.isnan(after.loss) or after.records == 0:
        return None
    r = retention(base, after)
    metrics["retention_vs_base"] = r.value
    metrics["retention_vs_base_records"] = float(r.records)
    if r.value < config.min_retention:
        return (
            f"retention of the base model's knowledge {r.value:.3f} < "
            f"{config.min_retention:.3f} on {r.records} held-out probe records, over the "
            "whole lineage"
        )
    return None


def _check_learned(
    config: GateConfig, before: EvalResult, after: EvalResult, metrics: dict[str, float]
) -> str | None:
    """Did the version learn its training records: exact match of their completions, or
    token accuracy where no record has a short completion to compare."""
    metrics.update(before.metrics("learned_parent"))
    metrics.update(after.metrics("learned"))
    metrics["min_learned"] = config.min_learned
    if after.exact_match is not None:
        value, what = after.exact_match, "exact match of the completions"
        parent, records = before.exact_match, after.exact_match_records
    elif after.token_accuracy is not None:
        value, what = after.token_accuracy, "token accuracy"
        parent, records = before.token_accuracy, after.records
    else:
        return None
    metrics["learned"] = value
    metrics["learned_on_exact_match"] = float(after.exact_match is not None)
    if value < config.min_learned:
        was = f" (the parent: {parent:.3f})" if parent is not None else ""
        return (
            f"learned {value:.3f} < {config.min_learned:.3f}: {what} on {records} of its own "
            f"training records{was}; the version did not learn what it was given"
        )
    return None


def _check_new_data(
    config: GateConfig,
    before: EvalResult,
    after: EvalResult,
    on_training_data: bool,
    metrics: dict[str, float],
) -> str | None:
    metrics.update(before.metrics("new_parent"))
    metrics.update(after.metrics("new"))
    metrics["new_on_training_data"] = float(on_training_data)
    if math.isnan(before.loss) or math.isnan(after.loss):
        return "new-data loss could not be measured: no record fits cutoff_len"
    ratio = after.loss / before.loss if before.loss > 0 else math.inf
    metrics["new_loss_ratio"] = ratio
    if ratio > config.max_new_loss_ratio:
        where = "training" if on_training_data else "held-out"
        return (
            f"new-data loss {after.loss:.4f} is {ratio:.3f}x the parent's {before.loss:.4f} "
            f"(max {config.max_new_loss_ratio:.3f}x) on {after.records} {where} records"
        )
    return None


def evaluate_gate(
    config: GateConfig,
    *,
    new_before: EvalResult,
    new_after: EvalResult,
    retention_before: EvalResult | None = None,
    retention_after: EvalResult | None = None,
    new_on_training_data: bool = False,
    base_probes_before: EvalResult | None = None,
    base_probes_after: EvalResult | None = None,
    learned_before: EvalResult | None = None,
    learned_after: EvalResult | None = None,
) -> GateResult:
    """Decide on a candidate from its parent's (``*_before``) and its own scores.

    Without retention scores (no retention records: no probe set and an empty lineage
    buffer) the retention check is skipped with a note rather than failing every first job;
    so is the learned check without scores on the training records.
    """
    metrics: dict[str, float] = {
        "gate_enabled": float(config.enabled),
        "min_retention": config.min_retention,
        "max_new_loss_ratio": config.max_new_loss_ratio,
    }
    reasons: list[str] = []
    notes: list[str] = []
    if retention_before is None or retention_after is None or retention_after.records == 0:
        notes.append("retention not checked: no retention records")
    elif reason := _check_retention(config, retention_before, retention_after, metrics):
        reasons.append(reason)
    # Against the parent alone, small losses add up along a lineage unseen: the base
    # model's own knowledge is also checked against the base model itself.
    if (
        base_probes_before is not None
        and base_probes_after is not None
        and (
            reason := _check_base_retention(config, base_probes_before, base_probes_after, metrics)
        )
    ):
        reasons.append(reason)
    if learned_before is None or learned_after is None:
        notes.append("learning not checked: no training records scored")
    elif reason := _check_learned(config, learned_before, learned_after, metrics):
        reasons.append(reason)
    elif "learned" not in metrics:
        notes.append("learning not checked: no training record could be scored")
    if reason := _check_new_data(config, new_before, new_after, new_on_training_data, metrics):
        reasons.append(reason)
    if new_on_training_data:
        notes.append(
            f"new-data loss measured on the {new_after.records} training records "
            "(too few records to hold any out)"
        )
    if not config.enabled:
        notes.append("gate disabled: the result is reported but does not block")
        return GateResult(True, reasons, metrics, notes)
    return GateResult(not reasons, reasons, metrics, notes)
