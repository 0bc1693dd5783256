"""Sliding windows of request results and feedback, and the figures computed from them.
Pure Python.

Cost at sustained load: adding a result is an append; figures are computed on demand (RPC,
scrape, alert rules on each tick) and cached until the window changes, so 50+ results/s
per version cost one sort per changed window per tick.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    """One request result: ``at`` is its finish time (wall clock seconds).

    ``divergence`` is set for shadow results only (0..1; negative when unknown)."""

    at: float
    latency_ms: float
    ok: bool
    ttft_ms: float = 0.0
    completion_tokens: int = 0
    divergence: float = -1.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return percentile_sorted(ordered, q)


def percentile_sorted(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * min(max(q, 0.0), 100.0) / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass(frozen=True)
class Figures:
    requests: int = 0
    errors: int = 0
    error_rate: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    latency_p99_ms: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p95_ms: float = 0.0
    tokens_per_second: float = 0.0
    # Successful requests; latency figures cover only these (fast failures would
    # otherwise make a broken version look quick).
    ok_requests: int = 0
    feedback_count: int = 0
    feedback_mean: float = 0.0
    # Shadow results with a known divergence, and its mean.
    divergence_count: int = 0
    divergence_mean: float = 0.0


def figures(samples: Iterable[Sample], feedback: Sequence[float] = ()) -> Figures:
    items = list(samples)
    feedback_mean = sum(feedback) / len(feedback) if feedback else 0.0
    if not items:
        return Figures(feedback_count=len(feedback), feedback_mean=feedback_mean)
    ok = [s for s in items if s.ok]
    errors = len(items) - len(ok)
    latencies = sorted(s.latency_ms for s in ok)
    ttfts = sorted(s.ttft_ms for s in ok if s.ttft_ms > 0)
    divergences = [s.divergence for s in items if s.divergence >= 0]
    busy_s = sum(latencies) / 1000
    tokens = sum(s.completion_tokens for s in ok)
    return Figures(
        requests=len(items),
        errors=errors,
        error_rate=errors / len(items),
        latency_p50_ms=percentile_sorted(latencies, 50),
        latency_p95_ms=percentile_sorted(latencies, 95),
        latency_p99_ms=percentile_sorted(latencies, 99),
        ttft_p50_ms=percentile_sorted(ttfts, 50),
        ttft_p95_ms=percentile_sorted(ttfts, 95),
        tokens_per_second=tokens / busy_s if busy_s > 0 else 0.0,
        ok_requests=len(ok),
        divergence_count=len(divergences),
        divergence_mean=sum(divergences) / len(divergences) if divergences else 0.0,
        feedback_count=len(feedback),
        feedback_mean=feedback_mean,
    )


class FeedbackScores:
    """Feedback scores by request id in arrival order; a second score for the same request
    replaces the first (the user changed their mind) without moving it in time."""

    def __init__(self, max_items: int = 50_000) -> None:
        self._scores: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max = max_items
        # Bumped by every put: a replaced score changes the mean but not the count.
        self.revision = 0

    def put(self, request_id: str, score: float, at: float) -> None:
        self.revision += 1
        previous = self._scores.get(request_id)
        self._scores[request_id] = (previous[0] if previous else at, score)
        if len(self._scores) > self._max:
            self._scores.popitem(last=False)

    def prune(self, cutoff: float) -> bool:
        removed = False
        while self._scores:
            first = next(iter(self._scores.values()))
            if first[0] >= cutoff:
                break
            self._scores.popitem(last=False)
            removed = True
        return removed

    def scores(self) -> list[float]:
        return [score for _, score in self._scores.values()]

    def __len__(self) -> int:
        return len(self._scores)


class SlidingWindow:
    """Results and feedback of the last ``window_s`` seconds (bounded in count as well)."""

    def __init__(self, window_s: float, *, max_samples: int = 50_000) -> None:
        self.window_s = window_s
        self._samples: deque[Sample] = deque(maxlen=max_samples)
        self.feedback = FeedbackScores(max_samples)
        self._cached: Figures | None = None
        self._cached_cutoff = -math.inf

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)
        self._cached = None

    def add_feedback(self, request_id: str, score: float, at: float) -> None:
        self.feedback.put(request_id, score, at)
        self._cached = None

    def prune(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._samples and self._samples[0].at < cutoff:
            self._samples.popleft()
            self._cached = None
        if self.feedback.prune(cutoff):
            self._cached = None

    def samples(self, now: float) -> list[Sample]:
        self.prune(now)
        cutoff = now - self.window_s
        # Results from several gateways arrive slightly out of order.
        return [s for s in self._samples if s.at >= cutoff]

    def figures(self, now: float) -> Figures:
        self.prune(now)
        cutoff = now - self.window_s
        # Late results behind the head can fall out of the window without a prune.
        if self._cached is None or cutoff - self._cached_cutoff > 1.0:
            self._cached = figures(self.samples(now), self.feedback.scores())
            self._cached_cutoff = cutoff
        return self._cached

    def empty(self, now: float) -> bool:
        self.prune(now)
        return not self._samples and not len(self.feedback)


class StatsBook:
    """Sliding windows per (alias, version_id)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._windows: dict[tuple[str, str], SlidingWindow] = {}

    def _window(self, alias: str, version_id: str) -> SlidingWindow:
        key = (alias, version_id)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = SlidingWindow(self.window_s)
        return window

    def add(self, alias: str, version_id: str, sample: Sample) -> None:
        self._window(alias, version_id).add(sample)

    def add_feedback(
        self, alias: str, version_id: str, request_id: str, score: float, at: float
    ) -> None:
        self._window(alias, version_id).add_feedback(request_id, score, at)

    def has_alias(self, alias: str) -> bool:
        return any(a == alias for a, _ in self._windows)

    def keys(self, alias: str | None = None) -> list[tuple[str, str]]:
        return sorted(k for k in self._windows if alias is None or k[0] == alias)

    def figures(self, alias: str, version_id: str, now: float) -> Figures:
        window = self._windows.get((alias, version_id))
        return window.figures(now) if window is not None else Figures()

    def active(self, now: float) -> list[tuple[str, str]]:
        """Versions with results or feedback in the window: the ones serving now."""
        return sorted(k for k, w in self._windows.items() if not w.empty(now))
