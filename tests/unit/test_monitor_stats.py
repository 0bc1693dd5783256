"""The release-analysis statistics: false-alarm rates and detection speed by seeded
simulation, Mann-Whitney U against known values."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from ftops_monitor.stats import (
    compare_error_rates,
    exceeds_rate,
    leans_worse,
    mann_whitney_greater,
    rate_upper_bound,
)

ALPHA = 0.05


def _first_rejection(
    rng: random.Random,
    p_candidate: float,
    p_stable: float,
    *,
    candidate_n: int,
    stable_per_candidate: int,
    every: int = 1,
) -> int | None:
    """Candidate results until the two-sample test first rejects (checked every
    ``every`` candidate results, as batches arrive), None if it never does."""
    xc = xs = ns = 0
    for n in range(1, candidate_n + 1):
        xc += rng.random() < p_candidate
        for _ in range(stable_per_candidate):
            xs += rng.random() < p_stable
        ns += stable_per_candidate
        if n % every == 0 and compare_error_rates(xc, n, xs, ns, ALPHA).rejected:
            return n
    return None


@pytest.mark.parametrize("rate", [0.02, 0.1])
def test_two_sample_test_false_alarm_rate_with_continuous_peeking(rate: float) -> None:
    rng = random.Random(7)
    runs = 150
    alarms = sum(
        _first_rejection(rng, rate, rate, candidate_n=200, stable_per_candidate=3, every=5)
        is not None
        for _ in range(runs)
    )
    assert alarms / runs <= ALPHA


def test_one_sample_cap_test_false_alarm_rate_at_the_cap() -> None:
    # True rate exactly at the cap: the hardest null. Checked after every result.
    rng = random.Random(11)
    cap, runs, alarms = 0.05, 400, 0
    for _ in range(runs):
        errors = 0
        for n in range(1, 401):
            errors += rng.random() < cap
            if exceeds_rate(errors, n, cap, ALPHA).rejected:
                alarms += 1
                break
    assert alarms / runs <= ALPHA


def test_clear_failure_is_caught_after_a_dozen_requests() -> None:
    # 30% errors against a clean stable taking 19x the traffic (a 5% canary step).
    rng = random.Random(3)
    found = [
        _first_rejection(rng, 0.3, 0.0, candidate_n=60, stable_per_candidate=19) for _ in range(100)
    ]
    assert all(n is not None for n in found)
    counts = [n for n in found if n is not None]
    assert statistics.median(counts) <= 14
    assert max(counts) <= 45


def test_cap_test_catches_clear_failure_fast() -> None:
    rng = random.Random(5)
    counts = []
    for _ in range(100):
        errors = 0
        for n in range(1, 200):
            errors += rng.random() < 0.3
            if exceeds_rate(errors, n, 0.05, ALPHA).rejected:
                counts.append(n)
                break
    assert len(counts) == 100
    assert statistics.median(counts) <= 14


def test_small_regressions_need_more_evidence_than_large_ones() -> None:
    rng = random.Random(9)
    big = [
        _first_rejection(rng, 0.3, 0.01, candidate_n=400, stable_per_candidate=9) for _ in range(30)
    ]
    small = [
        _first_rejection(rng, 0.08, 0.01, candidate_n=400, stable_per_candidate=9)
        for _ in range(30)
    ]
    assert statistics.median(n or 401 for n in big) < statistics.median(n or 401 for n in small)


def test_leaning_worse_is_the_bar_for_passing() -> None:
    assert leans_worse(2, 20, 0, 300)  # 10% against a clean stable
    assert leans_worse(1, 20, 0, 400)
    assert not leans_worse(1, 40, 0, 400)  # a one-off among more results
    assert not leans_worse(1, 20, 4, 200)  # the stable fails as often
    assert not leans_worse(0, 20, 0, 20)
    assert not leans_worse(0, 0, 0, 0)


def test_rate_upper_bound_is_a_valid_bound() -> None:
    assert rate_upper_bound(0, 0, ALPHA) == 1.0
    assert rate_upper_bound(0, 1000, ALPHA) < 0.01
    assert 0.1 < rate_upper_bound(10, 100, ALPHA) < 0.25
    # Narrows as results accumulate.
    assert rate_upper_bound(10, 1000, ALPHA) < rate_upper_bound(1, 100, ALPHA)


def test_error_tests_edge_cases() -> None:
    assert not exceeds_rate(0, 0, 0.05, ALPHA).rejected
    assert not exceeds_rate(1, 1, 1.0, ALPHA).rejected
    # Below the cap never rejects, however many results.
    assert not exceeds_rate(10, 10_000, 0.05, ALPHA).rejected
    result = exceeds_rate(10, 20, 0.05, ALPHA)
    assert result.rejected
    assert result.log_threshold == pytest.approx(math.log(20))
    assert not compare_error_rates(5, 5, 0, 0, ALPHA).rejected  # no stable data: no claim


# Reference values from scipy.stats.mannwhitneyu(x, y, alternative="greater",
# method="asymptotic") (tie- and continuity-corrected normal approximation).
A = [12.1, 14.3, 15.0, 15.0, 18.2, 19.9, 21.4, 22.0]
B = [10.0, 11.5, 12.1, 13.3, 14.0, 15.0, 16.2, 17.7, 12.9, 11.1]


@pytest.mark.parametrize(
    ("x", "y", "scale", "u", "p"),
    [
        (A, B, 1.0, 65.5, 0.01297158206803366),
        (A, B, 1.2, 49.0, 0.22493408533825754),
        ([1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], 1.0, 4.5, 0.9784196103697714),
    ],
)
def test_mann_whitney_matches_reference(
    x: list[float], y: list[float], scale: float, u: float, p: float
) -> None:
    result = mann_whitney_greater(x, y, scale=scale)
    assert result.u == pytest.approx(u)
    assert result.p_value == pytest.approx(p, rel=1e-9)


def test_mann_whitney_degenerate_inputs() -> None:
    assert mann_whitney_greater([], [1.0]).p_value == 1.0
    assert mann_whitney_greater([1.0], []).p_value == 1.0
    assert mann_whitney_greater([5.0, 5.0], [5.0, 5.0]).p_value == 1.0  # all tied


def _latencies(rng: random.Random, n: int, median_ms: float) -> list[float]:
    return [median_ms * math.exp(rng.gauss(0, 0.25)) for _ in range(n)]


def test_two_times_slower_candidate_is_caught_within_a_few_requests() -> None:
    rng = random.Random(21)
    needed = []
    for _ in range(50):
        stable = _latencies(rng, 200, 100.0)
        candidate: list[float] = []
        for n in range(1, 60):
            candidate += _latencies(rng, 1, 200.0)
            if n >= 5 and mann_whitney_greater(candidate, stable, scale=1.2).p_value < 0.02:
                needed.append(n)
                break
    assert len(needed) == 50
    assert statistics.median(needed) <= 8


def test_latency_false_alarms_within_the_allowed_effect() -> None:
    # Candidate 10% slower (inside the 20% allowed) judged after every result: rarely flagged.
    rng = random.Random(23)
    runs, alarms = 100, 0
    for _ in range(runs):
        stable = _latencies(rng, 300, 100.0)
        candidate: list[float] = []
        for n in range(1, 101):
            candidate += _latencies(rng, 1, 110.0)
            if n >= 5 and mann_whitney_greater(candidate, stable, scale=1.2).p_value < 0.02:
                alarms += 1
                break
    assert alarms / runs <= 0.05
