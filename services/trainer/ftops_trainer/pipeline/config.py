"""What each pipeline stage does, and whether it runs. Defaults suit small fine-tuning
sets: cleaning, scoring and deduplication on; balancing and time decay off until given a
target or a half-life."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

QUALITY_SIGNALS = ("length", "alnum", "repetition")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class CleaningConfig:
    """NFC, control characters out (except newline and tab), whitespace runs collapsed
    (indentation kept), records with an emptied required field dropped."""

    enabled: bool = True


@dataclass(frozen=True)
class QualityConfig:
    """Each signal scores 0..1 and the record's score is their weighted geometric mean,
    so one signal near 0 sinks a record whatever the others say; a record scored below
    ``threshold`` is dropped.

    - length: 1 within [min_chars, max_chars], n / min_chars below, max_chars / n above.
    - alnum: the share of letters and digits among non-space characters, scaled so that
      ``min_alnum_ratio`` and above score 1 (symbol soup scores 0).
    - repetition: the share of distinct word ``repetition_ngram``-grams (1 without any).

    With the defaults, "buy buy buy ..." (0.32), "@@@ ###" (0) and empty-ish records go;
    "fine" (0.71) and "2+2=" / "4" stay.
    """

    enabled: bool = True
    threshold: float = 0.5
    min_chars: int = 16
    max_chars: int = 32_000
    min_alnum_ratio: float = 0.5
    repetition_ngram: int = 3
    weights: Mapping[str, float] = field(
        default_factory=lambda: {"length": 1.0, "alnum": 1.0, "repetition": 2.0}
    )

    def __post_init__(self) -> None:
        _check(0.0 <= self.threshold <= 1.0, "quality threshold must be within [0, 1]")
        _check(0 < self.min_chars <= self.max_chars, "need 0 < min_chars <= max_chars")
        _check(0.0 < self.min_alnum_ratio <= 1.0, "min_alnum_ratio must be within (0, 1]")
        _check(self.repetition_ngram >= 1, "repetition_ngram must be at least 1")
        unknown = sorted(set(self.weights) - set(QUALITY_SIGNALS))
        _check(not unknown, f"unknown quality signals {unknown}; known: {QUALITY_SIGNALS}")
        _check(all(w >= 0 for w in self.weights.values()), "quality weights must be >= 0")
        _check(sum(self.weights.values()) > 0, "at least one quality weight must be > 0")


@dataclass(frozen=True)
class ExactDedupConfig:
    """Drop later records whose text matches an earlier one after casefolding and
    collapsing whitespace."""

    enabled: bool = True


@dataclass(frozen=True)
class NearDedupConfig:
    """Drop later records whose word ``ngram``-gram sets (the word set below ``ngram``
    words) have Jaccard similarity >= ``threshold`` with a kept one. MinHash LSH finds
    the candidates; bands are chosen so that a pair exactly at the threshold becomes a
    candidate with probability >= ``recall_at_threshold``; candidates are verified on
    the exact shingle sets."""

    enabled: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    recall_at_threshold: float = 0.95

    def __post_init__(self) -> None:
        _check(0.0 < self.threshold <= 1.0, "near-dup threshold must be within (0, 1]")
        _check(self.num_perm >= 2, "num_perm must be at least 2")
        _check(self.ngram >= 1, "ngram must be at least 1")
        _check(0.0 < self.recall_at_threshold < 1.0, "recall_at_threshold must be in (0, 1)")


@dataclass(frozen=True)
class BalanceConfig:
    """Downsample over-represented categories towards ``target`` (category -> share;
    shares are renormalised over the categories present). Records of categories not in
    the target pass through. No-op without a target."""

    enabled: bool = True
    target: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.target is not None:
            _check(bool(self.target), "balance target must name at least one category")
            _check(all(s > 0 for s in self.target.values()), "balance shares must be > 0")


@dataclass(frozen=True)
class DecayConfig:
    """Weight each record 0.5 ** (age / half_life_s), the age counted from the newest
    timestamp; records without one keep weight 1. No-op without a half-life."""

    enabled: bool = True
    half_life_s: float | None = None

    def __post_init__(self) -> None:
        _check(self.half_life_s is None or self.half_life_s > 0, "half_life_s must be > 0")


@dataclass(frozen=True)
class PipelineConfig:
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    decay: DecayConfig = field(default_factory=DecayConfig)
    seed: int = 0  # MinHash permutations and balancing samples
