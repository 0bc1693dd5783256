"""The monitor's core: consumes request results and release events, keeps per-version
windows and release state, runs the analysis, and publishes decisions.

Release state is rebuilt from the release events alone (the release stream keeps them),
and every update is idempotent on the event id and tolerant of order: the events of one
release come through different consumers, so a decision may arrive before its
``release.started`` (it is parked until then), and promotions never move backwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ftops.events.v1 import events_pb2
from ftops.monitor.v1 import monitor_pb2
from ftops_monitor.analysis import (
    Decision,
    DecisionKind,
    Release,
    ReleaseState,
    Thresholds,
    decide,
    decision_figures,
    next_step,
)
from ftops_monitor.windows import Figures, Sample, StatsBook
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from ftops_runtime.events import RELEASE_PROMOTE, RELEASE_ROLLBACK, new_meta

log = logging.getLogger(__name__)
# gRPC status names of results caused by the request, not by the version that served it.
CLIENT_FAULTS = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "CANCELLED"})

ARM_CANDIDATE = "candidate"
SEEN_MAX = 200_000


def _seconds(ts: Timestamp, default: float) -> float:
    return ts.seconds + ts.nanos / 1e9 if ts.seconds or ts.nanos else default


class SeenEvents:
    """Recently handled event ids (bounded; old ids are long past redelivery)."""

    def __init__(self, limit: int = SEEN_MAX) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, event_id: str) -> bool:
        """True the first time ``event_id`` is seen (empty ids are always new)."""
        if not event_id:
            return True
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._limit:
            self._ids.popitem(last=False)
        return True


class Monitor:
    def __init__(
        self,
        bus: EventBus,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.stats = StatsBook(window_s)
        self.clock = clock
        self.releases: dict[str, Release] = {}
        self._latest: dict[str, str] = {}  # alias -> release_id of its newest release
        self._parked: dict[str, list[Message]] = {}
        self._seen = SeenEvents()
        self._lock = asyncio.Lock()

    # -- state queries ---------------------------------------------------------------

    def release_for(self, alias: str) -> Release | None:
        release_id = self._latest.get(alias)
        return self.releases.get(release_id) if release_id else None

    def _known_alias(self, alias: str) -> bool:
        return alias in self._latest or self.stats.has_alias(alias)

    # -- event handlers --------------------------------------------------------------

    async def on_metrics(self, batch: events_pb2.RequestResultBatch, delivery: Delivery) -> None:
        if not self._seen.add(batch.meta.event_id):
            return
        self.ingest(batch.results)

    def ingest(self, results: Iterable[events_pb2.RequestResult]) -> None:
        now = self.clock()
        for result in results:
            if result.status in CLIENT_FAULTS:
                # A malformed or abandoned request says nothing about the version.
                continue
            sample = Sample(
                at=_seconds(result.finished_at, now),
                latency_ms=result.latency_ms,
                ok=result.status == "OK",
                ttft_ms=result.ttft_ms,
                completion_tokens=result.completion_tokens,
            )
            self.stats.add(result.alias, result.version_id, sample)
            if result.arm != ARM_CANDIDATE:
                continue
            release = self.release_for(result.alias)
            if (
                release is not None
                and result.version_id == release.candidate_version_id
                and result.release_id in ("", release.release_id)
            ):
                release.add_candidate_sample(sample)

    async def on_started(self, event: events_pb2.ReleaseStarted, delivery: Delivery) -> None:
        self.apply_started(event)

    async def on_promote(self, event: events_pb2.ReleasePromote, delivery: Delivery) -> None:
        self.apply_promote(event)

    async def on_rollback(self, event: events_pb2.ReleaseRollback, delivery: Delivery) -> None:
        self.apply_rollback(event)

    def apply_started(self, event: events_pb2.ReleaseStarted) -> None:
        if not self._seen.add(event.meta.event_id) or event.release_id in self.releases:
            return
        analysis = event.analysis
        release = Release(
            release_id=event.release_id,
            alias=event.alias,
            stable_version_id=event.stable_version_id,
            candidate_version_id=event.candidate_version_id,
            steps=list(event.steps) or [event.current_weight or 100],
            thresholds=Thresholds(
                min_requests=analysis.min_requests or 20,
                max_error_rate=analysis.max_error_rate,
                max_latency_ratio=analysis.max_latency_ratio,
                auto=analysis.auto,
            ),
            started_at=_seconds(event.meta.occurred_at, self.clock()),
            weight=event.current_weight,
        )
        self.releases[release.release_id] = release
        newest = self.release_for(event.alias)
        if newest is None or release.started_at >= newest.started_at:
            self._latest[event.alias] = release.release_id
        log.info(
            "release %s of %s: %s -> %s steps %s",
            release.release_id,
            release.alias,
            release.stable_version_id,
            release.candidate_version_id,
            release.steps,
        )
        for parked in self._parked.pop(release.release_id, []):
            if isinstance(parked, events_pb2.ReleasePromote):
                self._promote(release, parked)
            elif isinstance(parked, events_pb2.ReleaseRollback):
                self._rollback(release, parked)

    def apply_promote(self, event: events_pb2.ReleasePromote) -> None:
        if not self._seen.add(event.meta.event_id):
            return
        release = self.releases.get(event.release_id)
        if release is None:
            self._parked.setdefault(event.release_id, []).append(event)
            return
        self._promote(release, event)

    def apply_rollback(self, event: events_pb2.ReleaseRollback) -> None:
        if not self._seen.add(event.meta.event_id):
            return
        release = self.releases.get(event.release_id)
        if release is None:
            self._parked.setdefault(event.release_id, []).append(event)
            return
        self._rollback(release, event)

    def _promote(self, release: Release, event: events_pb2.ReleasePromote) -> None:
        at = _seconds(event.meta.occurred_at, self.clock())
        if release.apply_promote(event.step_index, event.weight, event.final, at):
            release.last_decision = "promote"
            release.last_reason = event.reason

    def _rollback(self, release: Release, event: events_pb2.ReleaseRollback) -> None:
        if release.apply_rollback():
            release.last_decision = "rollback"
            release.last_reason = event.reason

    # -- decisions -------------------------------------------------------------------

    async def analyze_once(self) -> list[Decision]:
        """Decide for every running automatic release; publishes what is decided."""
        made: list[Decision] = []
        async with self._lock:
            for alias, release_id in list(self._latest.items()):
                release = self.releases[release_id]
                if release.state is not ReleaseState.RUNNING or not release.thresholds.auto:
                    continue
                stable = self.stats.figures(alias, release.stable_version_id, self.clock())
                decision = decide(release, release.step_figures(), stable)
                if decision.kind is DecisionKind.WAIT:
                    continue
                await self._publish(release, decision, manual=False)
                made.append(decision)
        return made

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.analyze_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # NATS down: the same decision is taken again on a later tick.
                log.warning("release analysis failed: %s", exc)

    async def _publish(self, release: Release, decision: Decision, *, manual: bool) -> None:
        meta = new_meta(self.bus.service, self.bus.instance)
        if decision.kind is DecisionKind.PROMOTE:
            assert decision.next is not None
            promote = events_pb2.ReleasePromote(
                meta=meta,
                release_id=release.release_id,
                alias=release.alias,
                candidate_version_id=release.candidate_version_id,
                stable_version_id=release.stable_version_id,
                step_index=decision.next.step_index,
                weight=decision.next.weight,
                final=decision.next.final,
                reason=decision.reason,
                figures=decision.figures,
                manual=manual,
            )
            await self.bus.publish(RELEASE_PROMOTE, promote)
            self.apply_promote(promote)
        else:
            rollback = events_pb2.ReleaseRollback(
                meta=meta,
                release_id=release.release_id,
                alias=release.alias,
                candidate_version_id=release.candidate_version_id,
                stable_version_id=release.stable_version_id,
                reason=decision.reason,
                figures=decision.figures,
                manual=manual,
            )
            await self.bus.publish(RELEASE_ROLLBACK, rollback)
            self.apply_rollback(rollback)
        log.info(
            "%s%s of %s (%s): %s",
            "manual " if manual else "",
            decision.kind.value,
            release.alias,
            release.release_id,
            decision.reason,
        )

    def _require_release(self, alias: str) -> Release:
        release = self.release_for(alias)
        if release is None:
            raise NotFound(f"no release known for alias {alias!r}")
        return release

    def _manual_figures(self, release: Release) -> dict[str, float]:
        stable = self.stats.figures(release.alias, release.stable_version_id, self.clock())
        return decision_figures(
            release.step_figures(), stable.latency_p95_ms if stable.ok_requests else None
        )

    async def promote(self, alias: str, reason: str) -> monitor_pb2.ReleaseAnalysis:
        async with self._lock:
            release = self._require_release(alias)
            if release.state is not ReleaseState.RUNNING:
                raise FailedPrecondition(
                    f"release {release.release_id} of {alias!r} is {release.state.value}; "
                    "only a running release can be promoted"
                )
            step = next_step(release)
            decision = Decision(
                DecisionKind.PROMOTE,
                reason or "manual promotion",
                self._manual_figures(release),
                step,
            )
            await self._publish(release, decision, manual=True)
        return self.analysis(alias)

    async def rollback(self, alias: str, reason: str) -> monitor_pb2.ReleaseAnalysis:
        """Rolls back the running release, or undoes its completed promotion (the event
        then names the previous stable version as the target)."""
        async with self._lock:
            release = self._require_release(alias)
            if release.state is ReleaseState.ROLLED_BACK:
                raise FailedPrecondition(
                    f"release {release.release_id} of {alias!r} is already rolled back"
                )
            decision = Decision(
                DecisionKind.ROLLBACK, reason or "manual rollback", self._manual_figures(release)
            )
            await self._publish(release, decision, manual=True)
        return self.analysis(alias)

    # -- read API --------------------------------------------------------------------

    def _version_stats(self, alias: str, version_id: str) -> monitor_pb2.VersionStats:
        f: Figures = self.stats.figures(alias, version_id, self.clock())
        return monitor_pb2.VersionStats(
            alias=alias,
            version_id=version_id,
            requests=f.requests,
            errors=f.errors,
            error_rate=f.error_rate,
            latency_p50_ms=f.latency_p50_ms,
            latency_p95_ms=f.latency_p95_ms,
            latency_p99_ms=f.latency_p99_ms,
            ttft_p50_ms=f.ttft_p50_ms,
            tokens_per_second=f.tokens_per_second,
            window_seconds=self.stats.window_s,
        )

    def version_stats(self, alias: str, version_id: str) -> monitor_pb2.VersionStats:
        if not version_id:
            raise InvalidArgument("version_id is required")
        if alias and not self._known_alias(alias):
            raise NotFound(f"no metrics or release known for alias {alias!r}")
        return self._version_stats(alias, version_id)

    def list_stats(self, alias: str) -> monitor_pb2.ListVersionStatsResponse:
        if alias and not self._known_alias(alias):
            raise NotFound(f"no metrics or release known for alias {alias!r}")
        keys = self.stats.keys(alias if alias else None)
        return monitor_pb2.ListVersionStatsResponse(
            stats=[self._version_stats(a, v) for a, v in keys]
        )

    def analysis(self, alias: str) -> monitor_pb2.ReleaseAnalysis:
        release = self.release_for(alias)
        if release is None:
            if not self._known_alias(alias):
                raise NotFound(f"no metrics or release known for alias {alias!r}")
            return monitor_pb2.ReleaseAnalysis(alias=alias, state="none")
        return monitor_pb2.ReleaseAnalysis(
            alias=alias,
            release_id=release.release_id,
            state=release.state.value,
            step_index=release.step_index,
            weight=release.weight,
            stable=self._version_stats(alias, release.stable_version_id),
            candidate=self._version_stats(alias, release.candidate_version_id),
            last_decision=release.last_decision,
            last_reason=release.last_reason,
        )
