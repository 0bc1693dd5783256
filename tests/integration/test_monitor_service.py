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
    RELEASE_PAUSED,
    RELEASE_PROMOTE,
    RELEASE_RESUMED,
    RELEASE_ROLLBACK,
    RELEASE_STARTED,
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
    **analysis: Any,
) -> events_pb2.ReleaseStarted:
    settings: dict[str, Any] = {"min_requests": 10, "max_error_rate": 0.1, "auto": auto}
    settings.update(analysis)
    return events_pb2.ReleaseStarted(
        meta=new_meta("gateway", "test"),
        release_id=f"rel_{uuid.uuid4().hex[:8]}",
        alias=alias,
        stable_version_id="ver_s",
        candidate_version_id=candidate,
        strategy=events_pb2.RELEASE_STRATEGY_CANARY,
        steps=list(steps),
        current_weight=steps[0],
        analysis=events_pb2.AnalysisSettings(**settings),
    )


def _results(
    started: events_pb2.ReleaseStarted,
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
            release_id=started.release_id,
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
        await bus.publish(RELEASE_STARTED, good)
        await bus.publish(RELEASE_STARTED, bad)
        await asyncio.sleep(0.3)
        for started in (good, bad):
            await bus.publish(METRICS_REQUESTS, _batch(_results(started, "ver_s", "stable", 30)))
        await bus.publish(METRICS_REQUESTS, _batch(_results(good, "ver_c", "candidate", 12)))
        await bus.publish(METRICS_REQUESTS, _batch(_results(bad, "ver_bad", "candidate", 4)))
        await bus.publish(
            METRICS_REQUESTS,
            _batch(_results(bad, "ver_bad", "candidate", 8, status="UNAVAILABLE")),
        )

        promote = await promotes.wait_for(lambda e: e.release_id == good.release_id)
        assert (promote.step_index, promote.weight, promote.final) == (1, 50, False)
        assert promote.figures["requests"] == 12
        assert promote.figures["error_rate"] == 0
        assert promote.figures["stable_p95_ms"] > 0
        rollback = await rollbacks.wait_for(lambda e: e.release_id == bad.release_id)
        assert rollback.stable_version_id == "ver_s"
        assert rollback.candidate_version_id == "ver_bad"
        assert rollback.figures["errors"] == 8
        assert "error rate above the cap" in rollback.reason

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
        assert len([e for e in promotes.events if e.release_id == good.release_id]) == 1
    finally:
        await monitor.stop()


async def test_healthy_candidate_walks_every_step(nats_url: str, bus: EventBus) -> None:
    promotes = await _collect(bus, RELEASE_PROMOTE)
    monitor = await _monitor(nats_url)
    started = _started(f"walk-{uuid.uuid4().hex[:6]}", "ver_c", steps=(5, 25, 50, 100))
    try:
        await bus.publish(RELEASE_STARTED, started)
        seen = 0
        for expected in ((1, 25, False), (2, 50, False), (3, 100, True)):
            # Results of this step are newer than the promotion that began it.
            await bus.publish(
                METRICS_REQUESTS,
                _batch(
                    _results(started, "ver_s", "stable", 20),
                    _results(started, "ver_c", "candidate", 10, latency=42.0),
                ),
            )

            def moved_on(e: Any, after: int = seen) -> bool:
                return bool(e.release_id == started.release_id and e.step_index > after)

            event = await promotes.wait_for(moved_on)
            assert (event.step_index, event.weight, event.final) == expected
            assert not event.manual
            seen = event.step_index
        analysis = monitor.monitor.analysis(started.alias)
        assert analysis.state == "promoted"
    finally:
        await monitor.stop()


def _mirrored(
    started: events_pb2.ReleaseStarted, n: int, divergence: float
) -> list[events_pb2.RequestResult]:
    results = _results(started, started.candidate_version_id, "shadow", n)
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
    blue_green = _started(f"bg-{uuid.uuid4().hex[:6]}", "ver_c", steps=(100,))
    blue_green.strategy = events_pb2.RELEASE_STRATEGY_BLUE_GREEN
    blue_green.shadow_percent = 20
    shadow = _started(f"sh-{uuid.uuid4().hex[:6]}", "ver_c", steps=(100,), max_divergence=0.3)
    shadow.strategy = events_pb2.RELEASE_STRATEGY_SHADOW
    try:
        await bus.publish(RELEASE_STARTED, blue_green)
        await bus.publish(RELEASE_STARTED, shadow)
        for started, divergence in ((blue_green, 0.1), (shadow, 0.6)):
            await bus.publish(
                METRICS_REQUESTS,
                _batch(
                    _results(started, "ver_s", "stable", 20), _mirrored(started, 12, divergence)
                ),
            )
        switched = await promotes.wait_for(lambda e: e.release_id == blue_green.release_id)
        assert (switched.weight, switched.final) == (100, True)
        assert "12 shadow results" in switched.reason
        stopped = await rollbacks.wait_for(lambda e: e.release_id == shadow.release_id)
        assert "mean divergence 0.600" in stopped.reason
        assert stopped.figures["divergence_mean"] == pytest.approx(0.6)
        # A shadow release never promotes.
        assert not [e for e in promotes.events if e.release_id == shadow.release_id]
    finally:
        await monitor.stop()


async def test_two_times_slower_candidate_is_rolled_back_on_latency(
    nats_url: str, bus: EventBus
) -> None:
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    monitor = await _monitor(nats_url)
    started = _started(f"slow-{uuid.uuid4().hex[:6]}", "ver_slow", max_latency_ratio=0)
    try:
        await bus.publish(RELEASE_STARTED, started)
        await bus.publish(
            METRICS_REQUESTS,
            _batch(
                _results(started, "ver_s", "stable", 60, latency=100.0),
                _results(started, "ver_slow", "candidate", 8, latency=200.0),
            ),
        )
        rollback = await rollbacks.wait_for(lambda e: e.release_id == started.release_id)
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
        await bus.publish(RELEASE_STARTED, started)
        await bus.publish(
            RELEASE_PAUSED,
            events_pb2.ReleasePaused(
                meta=new_meta("gateway", "test"),
                release_id=started.release_id,
                alias=started.alias,
                reason="investigating",
            ),
        )
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
            assert not [e for e in rollbacks.events if e.release_id == started.release_id]
            analysis = await stub.GetReleaseAnalysis(request)
            assert analysis.paused
            assert analysis.figures["requests"] == 0  # results while paused do not count

            await bus.publish(
                RELEASE_RESUMED,
                events_pb2.ReleaseResumed(
                    meta=new_meta("gateway", "test"),
                    release_id=started.release_id,
                    alias=started.alias,
                ),
            )
            await _until(lambda: _paused(stub, request, False))
            await bus.publish(
                METRICS_REQUESTS,
                _batch(
                    _results(started, "ver_s", "stable", 30),
                    _results(started, "ver_c", "candidate", 10, status="INTERNAL"),
                ),
            )
            rollback = await rollbacks.wait_for(lambda e: e.release_id == started.release_id)
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
        await bus.publish(RELEASE_STARTED, started)
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
            rollback = await rollbacks.wait_for(lambda e: e.release_id == started.release_id)
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


async def test_manual_decisions_and_state_rebuilt_after_restart(
    nats_url: str, bus: EventBus
) -> None:
    promotes = await _collect(bus, RELEASE_PROMOTE)
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    monitor = await _monitor(nats_url)
    started = _started(f"manual-{uuid.uuid4().hex[:6]}", "ver_c", auto=False)
    try:
        await bus.publish(RELEASE_STARTED, started)
        async with channel(monitor.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            request = monitor_pb2.GetReleaseAnalysisRequest(alias=started.alias)
            await _until(lambda: _paused(stub, request, False))
            decision = monitor_pb2.ReleaseDecisionRequest(alias=started.alias, reason="by hand")
            analysis = await stub.PromoteRelease(decision)
            assert (analysis.step_index, analysis.weight) == (1, 50)
            analysis = await stub.PromoteRelease(decision)
            assert analysis.state == "promoted"
            final = await promotes.wait_for(
                lambda e: e.release_id == started.release_id and e.final
            )
            assert final.manual
            assert final.reason == "by hand"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.PromoteRelease(decision)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await monitor.stop()

    # A new monitor instance rebuilds the release state from the release history.
    again = await _monitor(nats_url)
    try:
        for _ in range(60):
            release = again.monitor.release_for(started.alias)
            if release is not None and release.state.value == "promoted":
                break
            await asyncio.sleep(0.05)
        assert again.monitor.analysis(started.alias).state == "promoted"
        async with channel(again.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            analysis = await stub.RollbackRelease(
                monitor_pb2.ReleaseDecisionRequest(alias=started.alias, reason="regression")
            )
            assert analysis.state == "rolled_back"
        back = await rollbacks.wait_for(lambda e: e.release_id == started.release_id)
        # Rolling back a completed promotion targets the previous stable version.
        assert (back.stable_version_id, back.candidate_version_id) == ("ver_s", "ver_c")
    finally:
        await again.stop()


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
