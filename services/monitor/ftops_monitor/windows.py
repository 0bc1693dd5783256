"""Sliding windows of request results and the figures computed from them. Pure Python."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One request result: ``at`` is its finish time (wall clock seconds)."""

    at: float
    latency_ms: float
    ok: bool
    ttft_ms: float = 0.0
    completion_tokens: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
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
    tokens_per_second: float = 0.0
    # Successful requests; latency figures cover only these (fast failures would
    # otherwise make a broken version look quick).
    ok_requests: int = 0


def figures(samples: Iterable[Sample]) -> Figures:
    items = list(samples)
    if not items:
        return Figures()
    ok = [s for s in items if s.ok]
    errors = len(items) - len(ok)
    latencies = [s.latency_ms for s in ok]
    ttfts = [s.ttft_ms for s in ok if s.ttft_ms > 0]
    busy_s = sum(latencies) / 1000
    tokens = sum(s.completion_tokens for s in ok)
    return Figures(
        requests=len(items),
        errors=errors,
        error_rate=errors / len(items),
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        latency_p99_ms=percentile(latencies, 99),
        ttft_p50_ms=percentile(ttfts, 50),
        tokens_per_second=tokens / busy_s if busy_s > 0 else 0.0,
        ok_requests=len(ok),
    )


class SlidingWindow:
    """Results of the last ``window_s`` seconds (bounded in count as well)."""

    def __init__(self, window_s: float, *, max_samples: int = 50_000) -> None:
        self.window_s = window_s
        self._samples: deque[Sample] = deque(maxlen=max_samples)

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)

    def prune(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._samples and self._samples[0].at < cutoff:
            self._samples.popleft()

    def samples(self, now: float) -> list[Sample]:
        self.prune(now)
        cutoff = now - self.window_s
        # Results from several gateways arrive slightly out of order.
        return [s for s in self._samples if s.at >= cutoff]

    def figures(self, now: float) -> Figures:
        return figures(self.samples(now))


class StatsBook:
    """Sliding windows per (alias, version_id)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._windows: dict[tuple[str, str], SlidingWindow] = {}

    def add(self, alias: str, version_id: str, sample: Sample) -> None:
        key = (alias, version_id)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = SlidingWindow(self.window_s)
        window.add(sample)

    def has_alias(self, alias: str) -> bool:
        return any(a == alias for a, _ in self._windows)

    def keys(self, alias: str | None = None) -> list[tuple[str, str]]:
        return sorted(k for k in self._windows if alias is None or k[0] == alias)

    def figures(self, alias: str, version_id: str, now: float) -> Figures:
        window = self._windows.get((alias, version_id))
        return window.figures(now) if window is not None else Figures()
