"""What the dashboard's charts plot: a point per second per (alias, version) and per alias
(the traffic split), kept in bounded rings (``history_s`` points per series) so memory
stays flat however long the monitor runs.

Request results come from a consumer of the dashboard's own (every replica sees all the
traffic, where the monitor's analysis consumer shares it among replicas): request and
error rate are the counts of each interval, latency percentiles those of the last
``latency_window_s`` seconds of successful results. Feedback mean and release state are
read from the monitor.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ftops.events.v1 import events_pb2
from ftops_monitor.analysis import Release
from ftops_monitor.monitor import ARM_CANDIDATE, ARM_STABLE, CLIENT_FAULTS, Monitor
from ftops_monitor.windows import percentile_sorted

Key = tuple[str, str]  # (alias, version_id)
# Results that finished longer ago than this arrive from a backlog (a consumer resumed
# after a restart): they are not this second's traffic.
STALE_S = 30.0
# Latencies kept per version for the percentiles (the newest, at high rates).
MAX_LATENCIES = 20_000


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


def _seconds(ts: Timestamp, default: float) -> float:
    return ts.seconds + ts.nanos / 1e9 if ts.seconds or ts.nanos else default


def _observed_share(release: Release, arms: Counter[tuple[str, str, str]]) -> float | None:
    """Candidate share (%) of the release's two arms in the interval."""
    candidate = arms[(release.alias, release.candidate_version_id, ARM_CANDIDATE)]
    stable = arms[(release.alias, release.stable_version_id, ARM_STABLE)]
    total = candidate + stable
    return 100.0 * candidate / total if total > 0 else None


def _drop_old(rings: dict[Any, deque[Any]], cutoff: float) -> None:
    """Forget series with no point since ``cutoff`` (versions no longer serving)."""
    for key in [k for k, ring in rings.items() if not ring or ring[-1].t < cutoff]:
        del rings[key]


class History:
    """Rings of per-second points per (alias, version) and per alias (traffic split)."""

    def __init__(
        self,
        monitor: Monitor,
        *,
        history_s: float = 900.0,
        interval_s: float = 1.0,
        latency_window_s: float = 10.0,
    ) -> None:
        self.monitor = monitor
        self.history_s = history_s
        self.interval_s = interval_s
        self.latency_window_s = latency_window_s
        self._maxlen = max(2, int(history_s / interval_s))
        self.versions: dict[Key, deque[VersionPoint]] = {}
        self.splits: dict[str, deque[SplitPoint]] = {}
        # Since the last sample: (results, errors) per version, results per (key, arm).
        self._counts: dict[Key, list[int]] = {}
        self._arms: Counter[tuple[str, str, str]] = Counter()
        # (finished at, latency ms) of successful results, per version.
        self._latencies: dict[Key, deque[tuple[float, float]]] = {}
        self._last_at: float | None = None

    def ingest(self, results: Iterable[events_pb2.RequestResult], now: float) -> None:
        for result in results:
            if result.status in CLIENT_FAULTS:
                continue  # the request's fault, not the version's (as the monitor counts)
            at = _seconds(result.finished_at, now)
            if at < now - STALE_S:
                continue
            key = (result.alias, result.version_id)
            counts = self._counts.setdefault(key, [0, 0])
            counts[0] += 1
            self._arms[(result.alias, result.version_id, result.arm)] += 1
            if result.status != "OK":
                counts[1] += 1
                continue
            ring = self._latencies.get(key)
            if ring is None:
                ring = self._latencies[key] = deque(maxlen=MAX_LATENCIES)
            ring.append((at, result.latency_ms))

    def _percentiles(self, key: Key, now: float) -> tuple[float, float, float] | None:
        ring = self._latencies.get(key)
        if ring is None:
            return None
        cutoff = now - self.latency_window_s
        while ring and ring[0][0] < cutoff:
            ring.popleft()
        if not ring:
            del self._latencies[key]
            return None
        # Results from several gateways arrive slightly out of order.
        ordered = sorted(ms for at, ms in ring if at >= cutoff)
        if not ordered:
            return None
        return (
            percentile_sorted(ordered, 50),
            percentile_sorted(ordered, 95),
            percentile_sorted(ordered, 99),
        )

    def sample(
        self, now: float
    ) -> tuple[list[tuple[Key, VersionPoint]], list[tuple[str, SplitPoint]]]:
        """Take one point per serving version and per alias with a release; returns them
        (the live update sent to open pages)."""
        if self._last_at is None:
            self._last_at = now
            return [], []
        dt = max(now - self._last_at, 1e-3)
        counts, arms = self._counts, self._arms
        self._counts, self._arms = {}, Counter()
        added_versions: list[tuple[Key, VersionPoint]] = []
        # Serving: results this interval, latencies in their window, or feedback.
        keys = set(counts) | set(self._latencies) | set(self.monitor.stats.active(now))
        for key in sorted(keys):
            results, errors = counts.get(key, (0, 0))
            latency = self._percentiles(key, now)
            f = self.monitor.window_figures(*key)
            if not results and latency is None and not f.feedback_count:
                continue
            p50, p95, p99 = latency if latency is not None else (None, None, None)
            point = VersionPoint(
                t=now,
                rps=results / dt,
                error_rate=errors / results if results > 0 else None,
                p50_ms=p50,
                p95_ms=p95,
                p99_ms=p99,
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
                _observed_share(release, arms),
            )
            self._ring(self.splits, release.alias).append(split)
            added_splits.append((release.alias, split))
        self._last_at = now
        self._forget_idle(now)
        return added_versions, added_splits

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

    def as_json(self, since: float | None = None) -> dict[str, Any]:
        """Every series with its points; with ``since``, only the points taken after it
        (a page that polls gets what it has not drawn yet) and the series that have any."""

        def points(ring: deque[Any]) -> list[dict[str, Any]]:
            if since is None:
                return [p.as_json() for p in ring]
            newer = []
            for point in reversed(ring):  # oldest first: stop at the newest already sent
                if point.t <= since:
                    break
                newer.append(point.as_json())
            newer.reverse()
            return newer

        versions = [
            {"alias": a, "version_id": v, "points": points(ring)}
            for (a, v), ring in sorted(self.versions.items())
        ]
        splits = [
            {"alias": alias, "points": points(ring)} for alias, ring in sorted(self.splits.items())
        ]
        if since is not None:
            versions = [v for v in versions if v["points"]]
            splits = [s for s in splits if s["points"]]
        return {"versions": versions, "splits": splits}
