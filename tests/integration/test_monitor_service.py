"""The monitor over real NATS and gRPC: request results in, release decisions, alerts,
feedback and metrics out."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf.message import Message
from nats.js.api import DeliverPolicy

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops_monitor.service import MonitorService
from ftops_monitor.settings import MonitorSettings
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.client import channel
from ftops_runtime.events import (
    METRICS_REQUESTS,
    MONITOR_ALERT,
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    ROUTE_CHANGED,
    derived_event_id,
    new_meta,
)

pytestmark = pytest.mark.integration


class Collector:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()

    async def handler(self, event: Message, delivery: Delivery) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events if predicate(e)]
            if found:
                return found[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event among {len(self.events)}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[EventBus]:
    async with EventBus(nats_url, service="test", instance=uuid.uuid4().hex[:6]) as b:
        await b.wait_ready(10)
        yield b


async def _collect(bus: EventBus, subject: str) -> Collector:
    collector = Collector()
    bus.subscribe(
        subject, f"t-{uuid.uuid4().hex[:8]}", collector.handler, deliver_policy=DeliverPolicy.NEW
    )
    await asyncio.sleep(0.3)  # consumer bound (the bus offers no signal for it)
    return collector


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def _monitor(nats_url: str, **overrides: Any) -> MonitorService:
    settings: dict[str, Any] = {
        "grpc_port": 0,
        "nats_url": nats_url,
        "instance_id": f"mon-{uuid.uuid4().hex[:6]}",
        "analysis_interval_s": 0.1,
        "shutdown_grace_s": 0.5,
        "metrics_port": 0,
        # Nothing listens there: evaluations are skipped (and the release judged anyway).
        "registry_address": f"127.0.0.1:{_closed_port()}",
        "registry_timeout_s": 0.5,
        "auth_mode": "disabled",  # access control has its own tests (test_access_control.py)
    }
    settings.update(overrides)
    service = MonitorService(MonitorSettings(**settings))
    await service.start()
    await service.bus.wait_ready(10)
    await asyncio.sleep(0.3)  # consumers bound
    return service


def _started(
    alias: str,
    candidate: str,
    *,
    auto: bool = True,
    steps: tuple[int, ...] = (10, 50, 100),
    strategy: events_pb2.ReleaseStrategy.ValueType = events_pb2.RELEASE_STRATEGY_CANARY,
    shadow_percent: int = 0,
    **analysis: Any,
) -> events_pb2.RouteChanged:
    """The gateway's route.changed for a release it just started (revision 1)."""
    settings: dict[str, Any] = {"min_requests": 10, "max_error_rate": 0.1, "auto": auto}
    settings.update(analysis)
    release = events_pb2.ReleaseSnapshot(
        release_id=f"rel_{uuid.uuid4().hex[:8]}",
        state="running",
        strategy=strategy,
        stable_version_id="ver_s",
        candidate_version_id=candidate,
        candidate_weight=steps[0],
        steps=list(steps),
        analysis=events_pb2.AnalysisSettings(**settings),
        shadow_percent=shadow_percent,
        change=events_pb2.ReleaseChange(kind="started", event_id=uuid.uuid4().hex),
    )
    release.started_at.GetCurrentTime()
    release.step_started_at.CopyFrom(release.started_at)
    release.change.occurred_at.CopyFrom(release.started_at)
    return _route(alias, 1, release)


def _route(
    alias: str, revision: int, release: events_pb2.ReleaseSnapshot
) -> events_pb2.RouteChanged:
    meta = new_meta("gateway", "test")
    meta.event_id = derived_event_id("route.changed", alias, revision)  # as the gateway's
    promoted = release.state == "promoted"
    return events_pb2.RouteChanged(
        meta=meta,
        alias=alias,
        revision=revision,
        stable_version_id=release.candidate_version_id if promoted else release.stable_version_id,
        release=release,
    )


def _changed(
    before: events_pb2.RouteChanged,
    kind: str,
    *,
    cause: str = "",
    reason: str = "",
    manual: bool = False,
    **fields: Any,
) -> events_pb2.RouteChanged:
    """The gateway's next route.changed: ``before``'s release after a ``kind`` change that
    set ``fields`` of its snapshot (a promotion or a resume starts the step over now)."""
    release = events_pb2.ReleaseSnapshot()
    release.CopyFrom(before.release)
    for name, value in fields.items():
        setattr(release, name, value)
    release.change.Clear()
    release.change.kind = kind
    release.change.event_id = cause or uuid.uuid4().hex
    release.change.reason = reason
    release.change.manual = manual
    release.change.occurred_at.GetCurrentTime()
    if release.state in ("promoted", "rolled_back"):
        release.candidate_weight = 0
        release.ClearField("step_started_at")
    elif kind in ("promote", "resumed"):
        release.step_started_at.CopyFrom(release.change.occurred_at)
    return _route(before.alias, before.revision + 1, release)


def _applied(
    before: events_pb2.RouteChanged,
    decision: events_pb2.ReleasePromote | events_pb2.ReleaseRollback,
) -> events_pb2.RouteChanged:
    """What the gateway publishes once it applied the monitor's decision."""
    cause, reason = decision.meta.event_id, decision.reason
    if isinstance(decision, events_pb2.ReleaseRollback):
        return _changed(before, "rollback", cause=cause, reason=reason, state="rolled_back")
    return _changed(
        before,
        "promote",
        cause=cause,
        reason=reason,
        state="promoted" if decision.final else "running",
        step_index=decision.step_index,
        candidate_weight=decision.weight,
    )


async def _follows(service: MonitorService, event: events_pb2.RouteChanged) -> None:
    """Until the monitor has taken the gateway's state at ``event``'s revision."""

    async def caught_up() -> bool:
        release = service.monitor.release_for(event.alias)
        return release is not None and release.revision >= event.revision

    await _until(caught_up)


def _results(
    started: events_pb2.RouteChanged,
    version: str,
    arm: str,
    n: int,
    status: str = "OK",
    latency: float = 40.0,
) -> list[events_pb2.RequestResult]:
    results = []
    for i in range(n):
        result = events_pb2.RequestResult(
            request_id=uuid.uuid4().hex,
            alias=started.alias,
            version_id=version,
            arm=arm,
            latency_ms=latency + i % 5,
            ttft_ms=5.0,
            completion_tokens=8,
            status=status,
            release_id=started.release.release_id,
        )
        result.finished_at.GetCurrentTime()
        results.append(result)
    return results


def _batch(*parts: list[events_pb2.RequestResult]) -> events_pb2.RequestResultBatch:
    return events_pb2.RequestResultBatch(
        meta=new_meta("gateway", "test"), results=[r for part in parts for r in part]
    )


async def test_monitor_promotes_healthy_and_rolls_back_failing(
    nats_url: str, bus: EventBus
) -> None:
    promotes = await _collect(bus, RELEASE_PROMOTE)
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    monitor = await _monitor(nats_url)
    good = _started(f"good-{uuid.uuid4().hex[:6]}", "ver_c")
    bad = _started(f"bad-{uuid.uuid4().hex[:6]}", "ver_bad")
    try:
        await bus.publish(ROUTE_CHANGED, good)
        await bus.publish(ROUTE_CHANGED, bad)
        await _follows(monitor, good)
        await _follows(monitor, bad)
        for started in (good, bad):
            await bus.publish(METRICS_REQUESTS, _batch(_results(started, "ver_s", "stable", 30)))
        await bus.publish(METRICS_REQUESTS, _batch(_results(good, "ver_c", "candidate", 12)))
        await bus.publish(METRICS_REQUESTS, _batch(_results(bad, "ver_bad", "candidate", 4)))
        # The candidate's own failures (not the platform's: those are not its errors).
        failing = _results(bad, "ver_bad", "candidate", 8, status="INTERNAL")
        for r in failing:
            r.failure_origin = "replica"
        await bus.publish(METRICS_REQUESTS, _batch(failing))

        promote = await promotes.wait_for(lambda e: e.release_id == good.release.release_id)
        assert (promote.step_index, promote.weight, promote.final) == (1, 50, False)
        assert promote.figures["requests"] == 12
        assert promote.figures["error_rate"] == 0
        assert promote.figures["stable_p95_ms"] > 0
        rollback = await rollbacks.wait_for(lambda e: e.release_id == bad.release.release_id)
        assert rollback.stable_version_id == "ver_s"
        assert rollback.candidate_version_id == "ver_bad"
        assert rollback.figures["errors"] == 8
        assert "error rate above the cap" in rollback.reason
        # The monitor's view changes with the gateway's state, not with its own decision.
        assert monitor.monitor.analysis(good.alias).step_index == 0
        assert monitor.monitor.analysis(bad.alias).state == "running"
        for before, decision in ((good, promote), (bad, rollback)):
            applied = _applied(before, decision)
            await bus.publish(ROUTE_CHANGED, applied)
            await _follows(monitor, applied)

        async with channel(monitor.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            stats = await stub.GetVersionStats(
                monitor_pb2.GetVersionStatsRequest(alias=bad.alias, version_id="ver_bad")
            )
            assert (stats.requests, stats.errors, stats.ok_requests) == (12, 8, 4)
            assert stats.window_seconds == 60
            listed = await stub.ListVersionStats(
                monitor_pb2.ListVersionStatsRequest(alias=good.alias)
            )
            assert {s.version_id for s in listed.stats} == {"ver_s", "ver_c"}
            analysis = await stub.GetReleaseAnalysis(
                monitor_pb2.GetReleaseAnalysisRequest(alias=good.alias)
            )
            assert (analysis.state, analysis.step_index, analysis.weight) == ("running", 1, 50)
            assert analysis.last_decision == "promote"
            assert analysis.verdict == "inconclusive"  # the new step has no results yet
            assert {c.name for c in analysis.checks} >= {"errors", "latency", "samples"}
            analysis = await stub.GetReleaseAnalysis(
                monitor_pb2.GetReleaseAnalysisRequest(alias=bad.alias)
            )
            assert analysis.state == "rolled_back"
            assert "cap" in analysis.last_reason
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetReleaseAnalysis(
                    monitor_pb2.GetReleaseAnalysisRequest(alias="no-such-alias")
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "no-such-alias" in (info.value.details() or "")
        # Nothing more for the good release: its next step has no traffic of its own.
        assert len([e for e in promotes.events if e.release_id == good.release.release_id]) == 1
    finally:
        await monitor.stop()


async def test_healthy_candidate_walks_every_step(nats_url: str, bus: EventBus) -> None:
    promotes = await _collect(bus, RELEASE_PROMOTE)
    monitor = await _monitor(nats_url)
    started = _started(f"walk-{uuid.uuid4().hex[:6]}", "ver_c", steps=(5, 25, 50, 100))
    try:
        await bus.publish(ROUTE_CHANGED, started)
        current = started
        for expected in ((1, 25, False), (2, 50, False), (3, 100, True)):
            await _follows(monitor, current)
            # Results of this step are newer than the promotion that began it.
            await bus.publish(
                METRICS_REQUESTS,
                _batch(
                    _results(started, "ver_s", "stable", 20),
                    _results(started, "ver_c", "candidate", 10, latency=42.0),
                ),
            )

            def moved_on(e: Any, after: int = current.release.step_index) -> bool:
                return bool(e.release_id == started.release.release_id and e.step_index > after)

            event = await promotes.wait_for(moved_on)
            assert (event.step_index, event.weight, event.final) == expected
            assert not event.manual
            # The gateway applies it and publishes the release's new state.
            current = _applied(current, event)
            await bus.publish(ROUTE_CHANGED, current)
        await _follows(monitor, current)
        analysis = monitor.monitor.analysis(started.alias)
        assert analysis.state == "promoted"
    finally:
        await monitor.stop()


def _mirrored(
    started: events_pb2.RouteChanged, n: int, divergence: float
) -> list[events_pb2.RequestResult]:
    results = _results(started, started.release.candidate_version_id, "shadow", n)
    for r in results:
        r.shadow = True
        r.shadow_of = uuid.uuid4().hex
        r.divergence = divergence
    return results


async def test_blue_green_switches_at_once_and_shadow_stops_on_divergence(
    nats_url: str, bus: EventBus
) -> None:
    promotes = await _collect(bus, RELEASE_PROMOTE)
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    monitor = await _monitor(nats_url)
    blue_green = _started(
        f"bg-{uuid.uuid4().hex[:6]}",
        "ver_c",
        steps=(100,),
        strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN,
        shadow_percent=20,
    )
    shadow = _started(
        f"sh-{uuid.uuid4().hex[:6]}",
        "ver_c",
        steps=(100,),
        strategy=events_pb2.RELEASE_STRATEGY_SHADOW,
        max_divergence=0.3,
    )
    try:
        for started in (blue_green, shadow):
            await bus.publish(ROUTE_CHANGED, started)
            await _follows(monitor, started)
        for started, divergence in ((blue_green, 0.1), (shadow, 0.6)):
            await bus.publish(
                METRICS_REQUESTS,
                _batch(
                    _results(started, "ver_s", "stable", 20), _mirrored(started, 12, divergence)
                ),
            )
        switched = await promotes.wait_for(lambda e: e.release_id == blue_green.release.release_id)
        assert (switched.weight, switched.final) == (100, True)
        assert "12 shadow results" in switched.reason
        stopped = await rollbacks.wait_for(lambda e: e.release_id == shadow.release.release_id)
        assert "mean divergence 0.600" in stopped.reason
        assert stopped.figures["divergence_mean"] == pytest.approx(0.6)
        # A shadow release never promotes.
        assert not [e for e in promotes.events if e.release_id == shadow.release.release_id]
    finally:
        await monitor.stop()


async def test_two_times_slower_candidate_is_rolled_back_on_latency(
    nats_url: str, bus: EventBus
) -> None:
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    monitor = await _monitor(nats_url)
    started = _started(f"slow-{uuid.uuid4().hex[:6]}", "ver_slow", max_latency_ratio=0)
    try:
        await bus.publish(ROUTE_CHANGED, started)
        await _follows(monitor, started)
        await bus.publish(
            METRICS_REQUESTS,
            _batch(
                _results(started, "ver_s", "stable", 60, latency=100.0),
                _results(started, "ver_slow", "candidate", 8, latency=200.0),
            ),
        )
        rollback = await rollbacks.wait_for(lambda e: e.release_id == started.release.release_id)
        assert "latency worse at 98% confidence" in rollback.reason
        assert rollback.figures["latency_p_value"] < 0.02
        assert rollback.figures["p50_ms"] > 1.9 * rollback.figures["stable_p50_ms"]
    finally:
        await monitor.stop()


async def test_pause_stops_decisions_and_resume_restarts_the_step(
    nats_url: str, bus: EventBus
) -> None:
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    monitor = await _monitor(nats_url)
    started = _started(f"pause-{uuid.uuid4().hex[:6]}", "ver_c")
    try:
        await bus.publish(ROUTE_CHANGED, started)
        paused = _changed(started, "paused", reason="investigating", manual=True, state="paused")
        await bus.publish(ROUTE_CHANGED, paused)
        async with channel(monitor.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            request = monitor_pb2.GetReleaseAnalysisRequest(alias=started.alias)
            await _until(lambda: _paused(stub, request))
            failing = _results(started, "ver_c", "candidate", 20, status="INTERNAL")
            await bus.publish(
                METRICS_REQUESTS, _batch(_results(started, "ver_s", "stable", 30), failing)
            )
            stats = monitor_pb2.GetVersionStatsRequest(alias=started.alias, version_id="ver_c")
            await _until(lambda: _requests(stub, stats, 20))
            await monitor.monitor.analyze_once()  # a tick that sees those results
            assert not [e for e in rollbacks.events if e.release_id == started.release.release_id]
            analysis = await stub.GetReleaseAnalysis(request)
            assert analysis.paused
            assert analysis.figures["requests"] == 0  # results while paused do not count

            resumed = _changed(paused, "resumed", manual=True, state="running")
            await bus.publish(ROUTE_CHANGED, resumed)
            await _until(lambda: _paused(stub, request, False))
            await bus.publish(
                METRICS_REQUESTS,
                _batch(
                    _results(started, "ver_s", "stable", 30),
                    _results(started, "ver_c", "candidate", 10, status="INTERNAL"),
                ),
            )
            rollback = await rollbacks.wait_for(
                lambda e: e.release_id == started.release.release_id
            )
            assert rollback.figures["requests"] == 10  # only the resumed step's results
    finally:
        await monitor.stop()


async def _until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def _paused(
    stub: monitor_pb2_grpc.MonitorServiceStub,
    request: monitor_pb2.GetReleaseAnalysisRequest,
    paused: bool = True,
) -> bool:
    try:
        analysis = await stub.GetReleaseAnalysis(request)
    except grpc.aio.AioRpcError:
        return False
    return bool(analysis.release_id) and analysis.paused == paused


async def _requests(
    stub: monitor_pb2_grpc.MonitorServiceStub,
    request: monitor_pb2.GetVersionStatsRequest,
    n: int,
) -> bool:
    try:
        stats = await stub.GetVersionStats(request)
    except grpc.aio.AioRpcError:
        return False
    return bool(stats.requests >= n)


async def test_feedback_over_grpc_changes_the_verdict(nats_url: str, bus: EventBus) -> None:
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    monitor = await _monitor(nats_url)
    # min_requests high: the step cannot pass before the feedback is in.
    started = _started(f"fb-{uuid.uuid4().hex[:6]}", "ver_c", min_requests=100, min_feedback=3)
    stable = _results(started, "ver_s", "stable", 10)
    candidate = _results(started, "ver_c", "candidate", 5)
    try:
        await bus.publish(ROUTE_CHANGED, started)
        await _follows(monitor, started)
        await bus.publish(METRICS_REQUESTS, _batch(stable, candidate))
        async with channel(monitor.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            stats = monitor_pb2.GetVersionStatsRequest(alias=started.alias, version_id="ver_c")
            await _until(lambda: _requests(stub, stats, 5))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitFeedback(
                    monitor_pb2.SubmitFeedbackRequest(request_id="unknown", score=1)
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitFeedback(
                    monitor_pb2.SubmitFeedbackRequest(request_id=stable[0].request_id, score=2)
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "0..1" in (info.value.details() or "")
            for r in stable[:3]:
                await stub.SubmitFeedback(
                    monitor_pb2.SubmitFeedbackRequest(request_id=r.request_id, score=0.9)
                )
            for r in candidate[:3]:
                reply = await stub.SubmitFeedback(
                    monitor_pb2.SubmitFeedbackRequest(
                        request_id=r.request_id, score=0.2, comment="wrong price"
                    )
                )
                assert (reply.version_id, reply.arm, reply.replaced) == (
                    "ver_c",
                    "candidate",
                    False,
                )
            rollback = await rollbacks.wait_for(
                lambda e: e.release_id == started.release.release_id
            )
            assert "mean score 0.200" in rollback.reason
            assert rollback.figures["stable_feedback_mean"] == pytest.approx(0.9)
            window = await stub.GetVersionStats(stats)
            assert window.feedback_count == 3
    finally:
        await monitor.stop()


async def test_alert_fires_and_resolves_and_metrics_scrape(nats_url: str, bus: EventBus) -> None:
    alerts = await _collect(bus, MONITOR_ALERT)
    monitor = await _monitor(nats_url, alert_error_rate=0.2, alert_for_s=0.2, alert_min_requests=5)
    started = _started(f"alert-{uuid.uuid4().hex[:6]}", "ver_c")
    try:
        await bus.publish(
            METRICS_REQUESTS,
            _batch(
                _results(started, "ver_s", "stable", 5),
                _results(started, "ver_s", "stable", 5, status="INTERNAL"),
            ),
        )
        firing = await alerts.wait_for(lambda e: e.alias == started.alias and e.state == "firing")
        assert (firing.rule, firing.version_id) == ("error_rate", "ver_s")
        assert firing.value == pytest.approx(0.5)
        assert firing.for_seconds >= 0.2
        async with channel(monitor.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            active = await stub.ListAlerts(monitor_pb2.ListAlertsRequest(alias=started.alias))
            assert [(a.rule, a.state) for a in active.alerts] == [("error_rate", "firing")]

        url = f"http://127.0.0.1:{monitor.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            text = await response.text()
        labels = f'alias="{started.alias}",rule="error_rate",version="ver_s"'
        assert f"ftops_monitor_alert_active{{{labels}}} 1.0" in text
        assert (
            f'ftops_monitor_window_requests{{alias="{started.alias}",version="ver_s"}} 10.0' in text
        )

        # 5 errors in 35 results: 14%, below the 20% threshold.
        await bus.publish(METRICS_REQUESTS, _batch(_results(started, "ver_s", "stable", 25)))
        resolved = await alerts.wait_for(
            lambda e: e.alias == started.alias and e.state == "resolved"
        )
        assert resolved.rule == "error_rate"
        assert len([e for e in alerts.events if e.alias == started.alias]) == 2
        assert monitor.monitor.list_alerts(started.alias).alerts == []
    finally:
        await monitor.stop()


async def test_manual_release_follows_the_gateway_and_is_rebuilt_after_restart(
    nats_url: str, bus: EventBus
) -> None:
    promotes = await _collect(bus, RELEASE_PROMOTE)
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    monitor = await _monitor(nats_url)
    started = _started(f"manual-{uuid.uuid4().hex[:6]}", "ver_c", auto=False)
    release_id = started.release.release_id
    try:
        await bus.publish(ROUTE_CHANGED, started)
        await _follows(monitor, started)
        # Evidence enough to pass the step: a manual release is still never decided.
        await bus.publish(
            METRICS_REQUESTS,
            _batch(
                _results(started, "ver_s", "stable", 30),
                _results(started, "ver_c", "candidate", 12),
            ),
        )
        async with channel(monitor.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            stats = monitor_pb2.GetVersionStatsRequest(alias=started.alias, version_id="ver_c")
            await _until(lambda: _requests(stub, stats, 12))
            assert await monitor.monitor.analyze_once() == []

            # The releaser promotes through the gateway; the monitor follows its state.
            step = _changed(
                started,
                "promote",
                reason="by hand",
                manual=True,
                step_index=1,
                candidate_weight=50,
            )
            await bus.publish(ROUTE_CHANGED, step)
            await _follows(monitor, step)
            request = monitor_pb2.GetReleaseAnalysisRequest(alias=started.alias)
            analysis = await stub.GetReleaseAnalysis(request)
            assert (analysis.state, analysis.step_index, analysis.weight) == ("running", 1, 50)
            assert (analysis.last_decision, analysis.last_reason) == ("promote", "by hand")
            final = _changed(step, "promote", manual=True, state="promoted", step_index=2)
            await bus.publish(ROUTE_CHANGED, final)
            await _follows(monitor, final)
            assert (await stub.GetReleaseAnalysis(request)).state == "promoted"
    finally:
        await monitor.stop()
    assert not [e for e in promotes.events if e.release_id == release_id]

    # A new monitor instance rebuilds the release state from the gateway's route.changed.
    again = await _monitor(nats_url)
    try:
        await _follows(again, final)
        assert again.monitor.analysis(started.alias).state == "promoted"
        # The gateway reverts the completed promotion; the new instance follows that too.
        reverted = _changed(
            final, "rollback", reason="regression", manual=True, state="rolled_back"
        )
        await bus.publish(ROUTE_CHANGED, reverted)
        await _follows(again, reverted)
        analysis = again.monitor.analysis(started.alias)
        assert (analysis.state, analysis.last_reason) == ("rolled_back", "regression")
        # An older state delivered late (stored again: a copy under its own id would be
        # dropped as a duplicate) does not move it back.
        late = events_pb2.RouteChanged()
        late.CopyFrom(step)
        late.meta.event_id = uuid.uuid4().hex
        await bus.publish(ROUTE_CHANGED, late)
        await asyncio.sleep(0.3)
        assert again.monitor.analysis(started.alias).state == "rolled_back"
    finally:
        await again.stop()
    assert not [e for e in rollbacks.events if e.release_id == release_id]


def test_meta_helper_is_complete() -> None:
    meta: common_pb2.EventMeta = new_meta("monitor", "x")
    assert meta.event_id
    assert meta.occurred_at.seconds > 0


async def test_metrics_port_taken_falls_back_to_a_free_one(nats_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monitor = await _monitor(nats_url, metrics_port=port)
        try:
            assert monitor.metrics_port not in (port, 0, -1)
            url = f"http://127.0.0.1:{monitor.metrics_port}/metrics"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                assert response.status == 200
        finally:
            await monitor.stop()
    off = await _monitor(nats_url, metrics_port=-1)
    try:
        assert off.metrics_port == -1
    finally:
        await off.stop()


async def test_a_burst_refused_on_both_arms_holds_and_alerts_instead_of_rolling_back(
    nats_url: str, bus: EventBus
) -> None:
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    alerts = await _collect(bus, MONITOR_ALERT)
    monitor = await _monitor(nats_url, alert_release_held_for_s=0.0)
    started = _started(f"burst-{uuid.uuid4().hex[:6]}", "ver_c", max_error_rate=0.05)
    release_id = started.release.release_id
    try:
        await bus.publish(ROUTE_CHANGED, started)
        await _follows(monitor, started)
        # 40 concurrent requests on the idle alias: both arms' replicas refuse most.
        refused = _results(started, "ver_s", "stable", 30, status="RESOURCE_EXHAUSTED")
        refused += _results(started, "ver_c", "candidate", 10, status="RESOURCE_EXHAUSTED")
        for result in refused[::2]:
            result.failure_origin = "capacity"  # newer gateways say so, older ones do not
        answered = _results(started, "ver_s", "stable", 10)
        answered += _results(started, "ver_c", "candidate", 6)
        await bus.publish(METRICS_REQUESTS, _batch(refused, answered))

        alert = await alerts.wait_for(
            lambda e: e.alias == started.alias and e.rule == "release_held_infrastructure"
        )
        assert (alert.state, alert.version_id) == ("firing", "ver_c")
        assert "infrastructure failures above 5%" in alert.message
        async with channel(monitor.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            analysis = await stub.GetReleaseAnalysis(
                monitor_pb2.GetReleaseAnalysisRequest(alias=started.alias)
            )
        assert analysis.verdict == "inconclusive"
        assert (analysis.figures["errors"], analysis.figures["infra_errors"]) == (0, 10)
        assert analysis.figures["stable_infra_errors"] == 30
        assert {c.name: c.status for c in analysis.checks}["infrastructure"] == "pending"
        assert [e for e in rollbacks.events if e.release_id == release_id] == []

        # The candidate's own failures still roll it back, held or not.
        failing = _results(started, "ver_c", "candidate", 10, status="INTERNAL")
        for result in failing:
            result.failure_origin = "replica"
        await bus.publish(METRICS_REQUESTS, _batch(failing))
        rollback = await rollbacks.wait_for(lambda e: e.release_id == release_id)
        assert "error rate above" in rollback.reason
        assert (rollback.figures["errors"], rollback.figures["infra_errors"]) == (10, 10)
    finally:
        await monitor.stop()
