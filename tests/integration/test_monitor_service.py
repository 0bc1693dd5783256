"""The monitor over real NATS and gRPC: request results in, release decisions out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

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
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    RELEASE_STARTED,
    new_meta,
)

pytestmark = pytest.mark.integration


class Collector:
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def handler(self, event: Message, delivery: Delivery) -> None:
        self.events.append(event)

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        for _ in range(int(timeout / 0.05)):
            found = [e for e in self.events if predicate(e)]
            if found:
                return found[0]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching event among {len(self.events)}")


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
    await asyncio.sleep(0.3)
    return collector


async def _monitor(nats_url: str, *, metrics_durable: str = "") -> MonitorService:
    service = MonitorService(
        MonitorSettings(
            grpc_port=0,
            nats_url=nats_url,
            instance_id=f"mon-{uuid.uuid4().hex[:6]}",
            metrics_durable=metrics_durable or f"mon-{uuid.uuid4().hex[:6]}",
            analysis_interval_s=0.1,
            shutdown_grace_s=0.5,
        )
    )
    await service.start()
    await service.bus.wait_ready(10)
    await asyncio.sleep(0.3)  # consumers bound
    return service


def _started(alias: str, candidate: str, *, auto: bool = True) -> events_pb2.ReleaseStarted:
    return events_pb2.ReleaseStarted(
        meta=new_meta("gateway", "test"),
        release_id=f"rel_{uuid.uuid4().hex[:8]}",
        alias=alias,
        stable_version_id="ver_s",
        candidate_version_id=candidate,
        strategy=events_pb2.RELEASE_STRATEGY_CANARY,
        steps=[10, 50, 100],
        current_weight=10,
        analysis=events_pb2.AnalysisSettings(
            min_requests=10, max_error_rate=0.1, max_latency_ratio=3.0, auto=auto
        ),
    )


def _batch(
    started: events_pb2.ReleaseStarted, version: str, arm: str, n: int, status: str = "OK"
) -> events_pb2.RequestResultBatch:
    results = []
    for i in range(n):
        result = events_pb2.RequestResult(
            request_id=uuid.uuid4().hex,
            alias=started.alias,
            version_id=version,
            arm=arm,
            latency_ms=40.0 + i % 5,
            ttft_ms=5.0,
            completion_tokens=8,
            status=status,
            release_id=started.release_id,
        )
        result.finished_at.GetCurrentTime()
        results.append(result)
    return events_pb2.RequestResultBatch(meta=new_meta("gateway", "test"), results=results)


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
            await bus.publish(METRICS_REQUESTS, _batch(started, "ver_s", "stable", 30))
        await bus.publish(METRICS_REQUESTS, _batch(good, "ver_c", "candidate", 12))
        await bus.publish(METRICS_REQUESTS, _batch(bad, "ver_bad", "candidate", 4))
        await bus.publish(
            METRICS_REQUESTS, _batch(bad, "ver_bad", "candidate", 4, status="UNAVAILABLE")
        )

        promote = await promotes.wait_for(lambda e: e.release_id == good.release_id)
        assert (promote.step_index, promote.weight, promote.final) == (1, 50, False)
        assert promote.figures["requests"] == 12
        assert promote.figures["error_rate"] == 0
        assert promote.figures["stable_p95_ms"] > 0
        rollback = await rollbacks.wait_for(lambda e: e.release_id == bad.release_id)
        assert rollback.stable_version_id == "ver_s"
        assert rollback.candidate_version_id == "ver_bad"
        assert rollback.figures["errors"] == 4
        assert "error" in rollback.reason
        await asyncio.sleep(0.3)
        # Nothing more for the good release until the next step has its own traffic.
        assert len([e for e in promotes.events if e.release_id == good.release_id]) == 1

        async with channel(monitor.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            stats = await stub.GetVersionStats(
                monitor_pb2.GetVersionStatsRequest(alias=bad.alias, version_id="ver_bad")
            )
            assert (stats.requests, stats.errors, stats.error_rate) == (8, 4, 0.5)
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
            assert analysis.candidate.requests == 12
            analysis = await stub.GetReleaseAnalysis(
                monitor_pb2.GetReleaseAnalysisRequest(alias=bad.alias)
            )
            assert analysis.state == "rolled_back"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetReleaseAnalysis(
                    monitor_pb2.GetReleaseAnalysisRequest(alias="no-such-alias")
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "no-such-alias" in (info.value.details() or "")
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
            for _ in range(40):
                if monitor.monitor.release_for(started.alias) is not None:
                    break
                await asyncio.sleep(0.05)
            request = monitor_pb2.ReleaseDecisionRequest(alias=started.alias, reason="by hand")
            analysis = await stub.PromoteRelease(request)
            assert (analysis.step_index, analysis.weight) == (1, 50)
            analysis = await stub.PromoteRelease(request)
            assert analysis.state == "promoted"
            final = await promotes.wait_for(
                lambda e: e.release_id == started.release_id and e.final
            )
            assert final.manual
            assert final.reason == "by hand"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.PromoteRelease(request)
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
