"""What the dashboard's charts plot: per-second points sampled from the monitor's state,
kept in bounded rings (``history_s`` points per series) so memory stays flat however long
the monitor runs.

Sampling reads what the monitor already keeps, so the request path pays nothing: request
rate and error rate come from the deltas of its result counters between two samples (the
rate of that second), latency percentiles and feedback mean from its sliding windows (the
figures the analysis and the alert rules see).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from ftops_monitor.analysis import Release
from ftops_monitor.monitor import ARM_CANDIDATE, ARM_STABLE, Monitor

Key = tuple[str, str]  # (alias, version_id)


@dataclass(frozen=True, slots=True)
class VersionPoint:
    t: float
    rps: float
    # Errors among the results of this interval; None when there were none.
    error_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    feedback_mean: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 3),
            "rps": round(self.rps, 3),
            "error_rate": _round(self.error_rate, 4),
            "p50_ms": _round(self.p50_ms, 2),
            "p95_ms": _round(self.p95_ms, 2),
            "p99_ms": _round(self.p99_ms, 2),
            "feedback_mean": _round(self.feedback_mean, 4),
        }


@dataclass(frozen=True, slots=True)
class SplitPoint:
    t: float
    release_id: str
    state: str  # running, paused, promoted, rolled_back
    # Candidate share of the traffic: what the release asks for, and what was observed in
    # this interval (None without traffic on either arm).
    weight: float
    observed: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 3),
            "release_id": self.release_id,
            "state": self.state,
            "weight": self.weight,
            "observed": _round(self.observed, 2),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _drop_old(rings: dict[Any, deque[Any]], cutoff: float) -> None:
    """Forget series with no point since ``cutoff`` (versions no longer serving)."""
    for key in [k for k, ring in rings.items() if not ring or ring[-1].t < cutoff]:
        del rings[key]


class History:
    """Rings of per-second points per (alias, version) and per alias (traffic split)."""

    def __init__(self, monitor: Monitor, *, history_s: float = 900.0, interval_s: float = 1.0):
        self.monitor = monitor
        self.history_s = history_s
        self.interval_s = interval_s
        self._maxlen = max(2, int(history_s / interval_s))
        self.versions: dict[Key, deque[VersionPoint]] = {}
        self.splits: dict[str, deque[SplitPoint]] = {}
        # Counter readings of the previous sample: (results, errors) per version and
        # results per (alias, version, arm).
        self._totals: dict[Key, tuple[int, int]] = {}
        self._arm_totals: dict[tuple[str, str, str], int] = {}
        self._last_at: float | None = None

    def _read_counters(self) -> tuple[dict[Key, tuple[int, int]], dict[tuple[str, str, str], int]]:
        totals: dict[Key, tuple[int, int]] = {}
        arms: dict[tuple[str, str, str], int] = {}
        for (alias, version_id, arm, outcome), n in self.monitor.results_total.items():
            results, errors = totals.get((alias, version_id), (0, 0))
            totals[(alias, version_id)] = (results + n, errors + (n if outcome == "error" else 0))
            arms[(alias, version_id, arm)] = arms.get((alias, version_id, arm), 0) + n
        return totals, arms

    def sample(
        self, now: float
    ) -> tuple[list[tuple[Key, VersionPoint]], list[tuple[str, SplitPoint]]]:
        """Take one point per serving version and per alias with a release; returns them
        (the live update sent to open pages)."""
        totals, arms = self._read_counters()
        if self._last_at is None:
            # The first reading is the baseline: counts from before the dashboard started
            # are not one second's traffic.
            self._totals, self._arm_totals, self._last_at = totals, arms, now
            return [], []
        dt = max(now - self._last_at, 1e-3)
        added_versions: list[tuple[Key, VersionPoint]] = []
        serving = set(self.monitor.stats.active(now))
        for key in sorted(serving | {k for k in totals if totals[k] != self._totals.get(k)}):
            results, errors = totals.get(key, (0, 0))
            before_results, before_errors = self._totals.get(key, (0, 0))
            new_results, new_errors = results - before_results, errors - before_errors
            f = self.monitor.window_figures(*key)
            has_latency = f.ok_requests > 0
            point = VersionPoint(
                t=now,
                rps=new_results / dt,
                error_rate=new_errors / new_results if new_results > 0 else None,
                p50_ms=f.latency_p50_ms if has_latency else None,
                p95_ms=f.latency_p95_ms if has_latency else None,
                p99_ms=f.latency_p99_ms if has_latency else None,
                feedback_mean=f.feedback_mean if f.feedback_count else None,
            )
            self._ring(self.versions, key).append(point)
            added_versions.append((key, point))
        added_splits: list[tuple[str, SplitPoint]] = []
        for release in self.monitor.latest_releases():
            state = "paused" if release.running and release.paused else release.state.value
            if not release.running and not self._ends_here(release, state):
                continue
            split = SplitPoint(
                now,
                release.release_id,
                state,
                float(release.weight),
                self._observed_share(release, arms),
            )
            self._ring(self.splits, release.alias).append(split)
            added_splits.append((release.alias, split))
        self._totals, self._arm_totals, self._last_at = totals, arms, now
        self._forget_idle(now)
        return added_versions, added_splits

    def _observed_share(
        self, release: Release, arms: dict[tuple[str, str, str], int]
    ) -> float | None:
        def delta(version_id: str, arm: str) -> int:
            key = (release.alias, version_id, arm)
            return arms.get(key, 0) - self._arm_totals.get(key, 0)

        candidate = delta(release.candidate_version_id, ARM_CANDIDATE)
        stable = delta(release.stable_version_id, ARM_STABLE)
        total = candidate + stable
        return 100.0 * candidate / total if total > 0 else None

    def _ring(self, rings: dict[Any, deque[Any]], key: Any) -> deque[Any]:
        ring = rings.get(key)
        if ring is None:
            ring = rings[key] = deque(maxlen=self._maxlen)
        return ring

    def _ends_here(self, release: Release, state: str) -> bool:
        """A finished release gets one last point (how it ended), then its line stops."""
        ring = self.splits.get(release.alias)
        if not ring:
            return False
        last = ring[-1]
        return last.release_id != release.release_id or last.state != state

    def _forget_idle(self, now: float) -> None:
        cutoff = now - self.history_s
        _drop_old(self.versions, cutoff)
        _drop_old(self.splits, cutoff)

    def as_json(self) -> dict[str, Any]:
        return {
            "versions": [
                {"alias": a, "version_id": v, "points": [p.as_json() for p in ring]}
                for (a, v), ring in sorted(self.versions.items())
            ],
            "splits": [
                {"alias": alias, "points": [p.as_json() for p in ring]}
                for alias, ring in sorted(self.splits.items())
            ],
        }
