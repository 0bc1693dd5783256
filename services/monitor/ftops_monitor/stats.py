"""The statistics behind release analysis. Pure Python, no state; see docs/analysis.md.

Error rates: always-valid sequential tests built from beta-binomial mixture likelihood
ratios. For results x errors out of n and a mixing prior p ~ Beta(a, b),

    M_n = ∫ p^x (1-p)^(n-x) dBeta(p; a, b) = B(a + x, b + n - x) / B(a, b)

and for any true rate p, M_n / L_n(p) is a nonnegative martingale with mean 1 (L_n(p) is
the likelihood p^x (1-p)^(n-x)). By Ville's inequality P(sup_n M_n / L_n(p) >= 1/alpha)
<= alpha, so checking the ratio after every result (or every batch) keeps the false-alarm
rate at alpha no matter how often we look. Two uses:

* ``exceeds_rate(x, n, p0)``: H0 "rate <= p0"; the denominator is sup_{p <= p0} L_n(p),
  which is at least L_n(true p) under H0, so the statistic stays below the martingale.
* ``rate_upper_bound(x, n, alpha)``: the confidence sequence {p : M_n / L_n(p) < 1/alpha},
  whose upper end holds for all n at once with probability >= 1 - alpha.

Candidate against stable (``compare_error_rates``) combines both with a union bound:
the stable rate's upper confidence sequence at alpha/2, and the candidate tested against
that bound at alpha/2. If the stable bound holds (prob >= 1 - alpha/2) and candidate rate
<= stable rate, the candidate test is below its martingale, so the total false-alarm rate
is at most alpha.

Latency: one-sided Mann-Whitney U (normal approximation with tie correction and
continuity correction) of the candidate against the stable latencies scaled by
(1 + allowed effect), as Kayenta's judge does.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

# Mixing prior for the candidate's error rate under the alternative. Beta(2, 6) (mean 0.25,
# mode 1/6) weighs the rates a broken version shows (10-50%) and little near 0: against a 5%
# cap a 30%-failing candidate is caught after a median 9 results (uniform prior: 11), with no
# loss at 10-15% (docs/analysis.md). Any fixed prior keeps the test valid.
CANDIDATE_PRIOR = (2.0, 6.0)
# Prior of the confidence sequence on the stable rate: uniform, no opinion.
BASELINE_PRIOR = (1.0, 1.0)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _log_likelihood(errors: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if errors == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if errors == n else -math.inf
    return errors * math.log(p) + (n - errors) * math.log1p(-p)


def _log_mixture(errors: int, n: int, prior: tuple[float, float]) -> float:
    a, b = prior
    return _log_beta(a + errors, b + n - errors) - _log_beta(a, b)


@dataclass(frozen=True)
class SequentialResult:
    """``log_lr`` is the log of the mixture likelihood ratio; the test rejects once it
    reaches ``log_threshold`` (log 1/alpha)."""

    rejected: bool
    log_lr: float
    log_threshold: float
    bound: float = 0.0  # the rate tested against (stable's upper bound or the cap)


def exceeds_rate(
    errors: int,
    n: int,
    p0: float,
    alpha: float,
    *,
    prior: tuple[float, float] = CANDIDATE_PRIOR,
) -> SequentialResult:
    """Always-valid test of H0 "error rate <= p0" after ``errors`` of ``n`` results."""
    threshold = math.log(1.0 / alpha)
    if n <= 0 or p0 >= 1.0:
        return SequentialResult(False, 0.0, threshold, p0)
    observed = errors / n
    log_lr = _log_mixture(errors, n, prior) - _log_likelihood(errors, n, min(observed, p0))
    return SequentialResult(observed > p0 and log_lr >= threshold, log_lr, threshold, p0)


def rate_upper_bound(
    errors: int, n: int, alpha: float, *, prior: tuple[float, float] = BASELINE_PRIOR
) -> float:
    """Upper end of the always-valid (1 - alpha) confidence sequence of an error rate."""
    if n <= 0:
        return 1.0
    threshold = math.log(1.0 / alpha)
    mixture = _log_mixture(errors, n, prior)
    low, high = errors / n, 1.0
    if mixture - _log_likelihood(errors, n, high) < threshold:
        return 1.0
    # M/L(p) grows with p above the observed rate: bisect for where it crosses 1/alpha.
    for _ in range(48):
        mid = (low + high) / 2
        if mixture - _log_likelihood(errors, n, mid) < threshold:
            low = mid
        else:
            high = mid
    return high


def compare_error_rates(
    candidate_errors: int,
    candidate_n: int,
    stable_errors: int,
    stable_n: int,
    alpha: float,
) -> SequentialResult:
    """Always-valid test of H0 "candidate error rate <= stable error rate" (see module)."""
    bound = rate_upper_bound(stable_errors, stable_n, alpha / 2)
    return exceeds_rate(candidate_errors, candidate_n, bound, alpha / 2)


def leans_worse(candidate_errors: int, candidate_n: int, stable_errors: int, stable_n: int) -> bool:
    """Whether the data favour "candidate worse than stable" (mixture likelihood ratio
    above 1 against the stable's smoothed point estimate). Not a test: the bar a step must
    clear to pass, so a candidate does not pass on too little evidence of being fine."""
    if candidate_n <= 0:
        return False
    stable_rate = (stable_errors + 1) / (stable_n + 2)
    return exceeds_rate(candidate_errors, candidate_n, stable_rate, 1.0).log_lr > 0


@dataclass(frozen=True)
class MannWhitney:
    """``u`` counts (candidate, baseline) pairs where the candidate is slower (ties 1/2)."""

    u: float
    z: float
    p_value: float  # one-sided: candidate slower than the scaled baseline


def _tie_term(values: Iterable[float]) -> float:
    """Sum of t^3 - t over the groups of equal values."""
    return float(sum(t**3 - t for t in Counter(values).values() if t > 1))


def mann_whitney_greater(
    candidate: Sequence[float], baseline: Sequence[float], *, scale: float = 1.0
) -> MannWhitney:
    """One-sided Mann-Whitney U of H1 "candidate > baseline * scale" (normal approximation,
    tie and continuity corrected). p_value 1.0 when either side is empty."""
    n1, n2 = len(candidate), len(baseline)
    if n1 == 0 or n2 == 0:
        return MannWhitney(0.0, 0.0, 1.0)
    base = sorted(v * scale for v in baseline)
    # U by binary search: O((n1 + n2) log n2), cheap enough for every analysis tick.
    u = 0.0
    for value in candidate:
        below = bisect_left(base, value)
        equal = bisect_right(base, value, lo=below) - below
        u += below + 0.5 * equal
    n = n1 + n2
    ties = _tie_term(chain(candidate, base))
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return MannWhitney(u, 0.0, 1.0)
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return MannWhitney(u, z, 0.5 * math.erfc(z / math.sqrt(2.0)))
