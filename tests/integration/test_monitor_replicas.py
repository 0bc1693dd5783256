"""Two monitor replicas on one JetStream: each sees every request result and every user's
score whichever replica took it, both judge a release on the same evidence, and their
identical decision is stored once."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import nats
import nats.errors
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from ftops.events.v1 import events_pb2
from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops_monitor.analysis import DecisionKind
from ftops_monitor.service import MonitorService
from ftops_monitor.settings import MonitorSettings
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.client import channel
from ftops_runtime.events import (
    METRICS_FEEDBACK,
    METRICS_REQUESTS,
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    ROUTE_CHANGED,
    derived_event_id,
    new_meta,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[EventBus]:
    async with EventBus(nats_url, service="test", instance=uuid.uuid4().hex[:6]) as b:
        await b.wait_ready(10)
        yield b


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _settings(nats_url: str, instance_id: str = "") -> MonitorSettings:
    return MonitorSettings(
        grpc_port=0,
        nats_url=nats_url,
        instance_id=instance_id or f"mon-{uuid.uuid4().hex[:6]}",
        analysis_interval_s=0.1,
        shutdown_grace_s=0.5,
        metrics_port=-1,
        # Nothing listens there: evaluations are skipped (and the release judged anyway).
        registry_address=f"127.0.0.1:{_closed_port()}",
        registry_timeout_s=0.5,
        auth_mode="disabled",
    )


async def _monitor(nats_url: str, instance_id: str = "") -> MonitorService:
    service = MonitorService(_settings(nats_url, instance_id))
    await service.start()
    await service.bus.wait_ready(10)
    await asyncio.sleep(0.3)  # consumers bound (the bus offers no signal for it)
    return service


@pytest.fixture
async def replicas(nats_url: str) -> AsyncIterator[tuple[MonitorService, MonitorService]]:
    a = await _monitor(nats_url)
    b = await _monitor(nats_url)
    try:
        yield a, b
    finally:
        await asyncio.gather(a.stop(), b.stop())


def _started(alias: str, **analysis: Any) -> events_pb2.RouteChanged:
    """The gateway's route.changed for a release it just started (revision 1)."""
    settings: dict[str, Any] = {"min_requests": 10, "max_error_rate": 0.1, "auto": True}
    settings.update(analysis)
    release = events_pb2.ReleaseSnapshot(
        release_id=f"rel_{uuid.uuid4().hex[:8]}",
        state="running",
        strategy=events_pb2.RELEASE_STRATEGY_CANARY,
        stable_version_id="ver_s",
        candidate_version_id="ver_c",
        candidate_weight=10,
        steps=[10, 50, 100],
        analysis=events_pb2.AnalysisSettings(**settings),
        change=events_pb2.ReleaseChange(kind="started", event_id=uuid.uuid4().hex),
    )
    release.started_at.GetCurrentTime()
    release.step_started_at.CopyFrom(release.started_at)
    return _route(alias, 1, release)


def _route(
    alias: str, revision: int, release: events_pb2.ReleaseSnapshot
) -> events_pb2.RouteChanged:
    meta = new_meta("gateway", "test")
    meta.event_id = derived_event_id("route.changed", alias, revision)  # as the gateway's
    return events_pb2.RouteChanged(
        meta=meta,
        alias=alias,
        revision=revision,
        stable_version_id=release.stable_version_id,
        release=release,
    )


def _changed(
    before: events_pb2.RouteChanged, kind: str, cause: str = "", **fields: Any
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
    release.change.occurred_at.GetCurrentTime()
    if release.state == "rolled_back":
        release.candidate_weight = 0
        release.ClearField("step_started_at")
    elif kind in ("promote", "resumed"):
        release.step_started_at.CopyFrom(release.change.occurred_at)
    return _route(before.alias, before.revision + 1, release)


def _batch(
    started: events_pb2.RouteChanged, version: str, arm: str, n: int, status: str = "OK"
) -> events_pb2.RequestResultBatch:
    batch = events_pb2.RequestResultBatch(meta=new_meta("gateway", "test"))
    for i in range(n):
        result = batch.results.add(
            request_id=uuid.uuid4().hex,
            alias=started.alias,
            version_id=version,
            arm=arm,
            latency_ms=40.0 + i % 5,
            status=status,
            release_id=started.release.release_id,
        )
        if status != "OK":
            result.failure_origin = "replica"  # the version's own failure
        result.finished_at.GetCurrentTime()
    return batch


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def _requests(service: MonitorService, alias: str, version: str) -> int:
    return service.monitor.window_figures(alias, version).requests


def _counted(service: MonitorService, alias: str, version: str, n: int) -> Callable[[], bool]:
    return lambda: _requests(service, alias, version) >= n


def _knows(service: MonitorService, release_id: str) -> Callable[[], bool]:
    return lambda: release_id in service.monitor.releases


def _follows(service: MonitorService, event: events_pb2.RouteChanged) -> Callable[[], bool]:
    """Whether the replica has taken the gateway's state at ``event``'s revision."""

    def caught_up() -> bool:
        release = service.monitor.release_for(event.alias)
        return release is not None and release.revision >= event.revision

    return caught_up


async def _stored_payloads(nats_url: str, subject: str) -> list[bytes]:
    """Every message the stream holds on ``subject`` (an ephemeral consumer from the
    stream's start)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            subject, durable=None, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        )
        found = []
        while True:
            try:
                msgs = await sub.fetch(batch=256, timeout=1.0)
            except TimeoutError:  # nats' own, or asyncio's when the fetch times out partway
                break
            for msg in msgs:
                found.append(msg.data)
                await msg.ack()
        return found
    finally:
        await nc.close()


async def _stored(nats_url: str, subject: str, release_id: str) -> list[events_pb2.ReleaseRollback]:
    """The stored events on ``subject`` for the release."""
    events = map(events_pb2.ReleaseRollback.FromString, await _stored_payloads(nats_url, subject))
    return [e for e in events if e.release_id == release_id]


async def test_every_replica_sees_every_result(
    bus: EventBus, replicas: tuple[MonitorService, MonitorService]
) -> None:
    a, b = replicas
    alias = f"all-{uuid.uuid4().hex[:6]}"
    started = _started(alias, auto=False)
    # Published once each: with a shared consumer the replicas would split these.
    batches = [_batch(started, "ver_s", "stable", 7) for _ in range(12)]
    for batch in batches:
        await bus.publish(METRICS_REQUESTS, batch)
    total = 7 * len(batches)
    for replica in (a, b):
        await _until(_counted(replica, alias, "ver_s", total))
    await asyncio.sleep(0.3)  # nothing more (no double counting) arrives later
    assert _requests(a, alias, "ver_s") == total
    assert _requests(b, alias, "ver_s") == total


async def test_both_replicas_decide_the_rollback_and_it_is_stored_once(
    nats_url: str, bus: EventBus, replicas: tuple[MonitorService, MonitorService]
) -> None:
    a, b = replicas
    # Analysis by hand from here: both replicas judge the same, complete evidence.
    await asyncio.gather(a.monitor.close(), b.monitor.close())
    started = _started(f"bad-{uuid.uuid4().hex[:6]}")
    await bus.publish(ROUTE_CHANGED, started)
    for replica in (a, b):
        await _until(_knows(replica, started.release.release_id))
    await bus.publish(METRICS_REQUESTS, _batch(started, "ver_s", "stable", 30))
    await bus.publish(METRICS_REQUESTS, _batch(started, "ver_c", "candidate", 12, "INTERNAL"))
    for replica in (a, b):
        await _until(_counted(replica, started.alias, "ver_c", 12))

    # Concurrently, as their loops would: each takes the decision and publishes it.
    made = await asyncio.gather(a.monitor.analyze_once(), b.monitor.analyze_once())
    assert [[d.kind for d in m] for m in made] == [[DecisionKind.ROLLBACK]] * 2
    for replica in (a, b):
        assert replica.monitor.decisions_total[(started.alias, "rollback")] == 1
        # Decided, not applied: the gateway owns the release's state.
        assert replica.monitor.analysis(started.alias).state == "running"

    [stored] = await _stored(nats_url, RELEASE_ROLLBACK, started.release.release_id)
    assert stored.candidate_version_id == "ver_c"
    assert "error rate above the cap" in stored.reason
    # Waiting for the gateway, neither replica decides the release again.
    again = await asyncio.gather(a.monitor.analyze_once(), b.monitor.analyze_once())
    assert list(again) == [[], []]
    # The gateway applies the one stored rollback: both replicas follow its state.
    applied = _changed(started, "rollback", cause=stored.meta.event_id, state="rolled_back")
    await bus.publish(ROUTE_CHANGED, applied)
    for replica in (a, b):
        await _until(_follows(replica, applied))
    assert [r.monitor.analysis(started.alias).state for r in (a, b)] == ["rolled_back"] * 2
    assert [r.monitor.decisions_total[(started.alias, "rollback")] for r in (a, b)] == [1, 1]


async def test_replicas_running_free_store_one_rollback(
    nats_url: str, bus: EventBus, replicas: tuple[MonitorService, MonitorService]
) -> None:
    a, b = replicas
    started = _started(f"free-{uuid.uuid4().hex[:6]}")
    await bus.publish(ROUTE_CHANGED, started)
    for replica in (a, b):
        await _until(_knows(replica, started.release.release_id))
    await bus.publish(METRICS_REQUESTS, _batch(started, "ver_s", "stable", 30))
    await bus.publish(METRICS_REQUESTS, _batch(started, "ver_c", "candidate", 12, "INTERNAL"))

    def decided(service: MonitorService) -> Callable[[], bool]:
        return lambda: service.monitor.decisions_total[(started.alias, "rollback")] == 1

    for replica in (a, b):
        await _until(decided(replica))
    await asyncio.sleep(0.5)  # a late second decision would be stored by now
    [stored] = await _stored(nats_url, RELEASE_ROLLBACK, started.release.release_id)
    applied = _changed(started, "rollback", cause=stored.meta.event_id, state="rolled_back")
    await bus.publish(ROUTE_CHANGED, applied)
    for replica in (a, b):
        await _until(_follows(replica, applied))
        assert replica.monitor.analysis(started.alias).state == "rolled_back"


async def test_a_restarted_replica_rebuilds_release_state(nats_url: str, bus: EventBus) -> None:
    # A restarted container keeps its FTOPS_INSTANCE_ID (the pod's name in Kubernetes): its
    # consumers must still replay the release history into the new process's empty state.
    instance = f"mon-{uuid.uuid4().hex[:6]}"
    first = await _monitor(nats_url, instance)
    started = _started(f"restart-{uuid.uuid4().hex[:6]}", auto=False)
    try:
        await bus.publish(ROUTE_CHANGED, started)
        await _until(_knows(first, started.release.release_id))
    finally:
        await first.stop()
    second = await _monitor(nats_url, instance)
    try:
        await _until(_knows(second, started.release.release_id))
    finally:
        await second.stop()


class _Decisions:
    def __init__(self) -> None:
        self.events: list[events_pb2.ReleasePromote] = []

    async def handler(self, event: events_pb2.ReleasePromote, delivery: Delivery) -> None:
        self.events.append(event)


async def test_a_replica_started_mid_release_rebuilds_it_from_route_changed(
    nats_url: str, bus: EventBus
) -> None:
    # The gateway started the release, took its first step and paused it, all before this
    # replica existed: it rebuilds state, step and pause from the replayed route.changed.
    started = _started(f"late-{uuid.uuid4().hex[:6]}")
    step = _changed(started, "promote", step_index=1, candidate_weight=50)
    paused = _changed(step, "paused", state="paused")
    for event in (started, step, paused):
        await bus.publish(ROUTE_CHANGED, event)
    promotes = _Decisions()
    bus.subscribe(
        RELEASE_PROMOTE,
        f"t-{uuid.uuid4().hex[:8]}",
        promotes.handler,
        deliver_policy=DeliverPolicy.NEW,
    )
    late = await _monitor(nats_url)
    try:
        await _until(_follows(late, paused))
        analysis = late.monitor.analysis(started.alias)
        assert (analysis.state, analysis.step_index, analysis.weight) == ("running", 1, 50)
        assert (analysis.release_id, analysis.paused) == (started.release.release_id, True)

        # Paused: evidence that would pass the step decides nothing.
        healthy = (
            _batch(started, "ver_s", "stable", 30),
            _batch(started, "ver_c", "candidate", 12),
        )
        for batch in healthy:
            await bus.publish(METRICS_REQUESTS, batch)
        await _until(_counted(late, started.alias, "ver_c", 12))
        assert await late.monitor.analyze_once() == []

        # Resumed: the rebuilt step is judged afresh and promoted to the next one.
        resumed = _changed(paused, "resumed", state="running")
        await bus.publish(ROUTE_CHANGED, resumed)
        await _until(_follows(late, resumed))
        for batch in (
            _batch(started, "ver_s", "stable", 30),
            _batch(started, "ver_c", "candidate", 12),
        ):
            await bus.publish(METRICS_REQUESTS, batch)
        await _until(
            lambda: any(e.release_id == started.release.release_id for e in promotes.events)
        )
        [promote] = [e for e in promotes.events if e.release_id == started.release.release_id]
        assert (promote.step_index, promote.weight, promote.final) == (2, 100, True)
        assert promote.figures["requests"] == 12  # the resumed step's results only
    finally:
        await late.stop()


async def _stored_feedback(nats_url: str, request_id: str) -> list[bytes]:
    """The payloads the stream holds on ``metrics.feedback`` for the request."""
    return [
        data
        for data in await _stored_payloads(nats_url, METRICS_FEEDBACK)
        if events_pb2.FeedbackSubmitted.FromString(data).request_id == request_id
    ]


async def _publish_raw(nats_url: str, payload: bytes, times: int) -> None:
    """Stores the same event ``times`` times (no ``Nats-Msg-Id``, so JetStream keeps every
    copy): each replica gets it that many times, as a redelivery would."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for _ in range(times):
            await js.publish(METRICS_FEEDBACK, payload)
    finally:
        await nc.close()


def _feedback(service: MonitorService, version: str, alias: str) -> tuple[int, float]:
    f = service.monitor.window_figures(alias, version)
    return f.feedback_count, round(f.feedback_mean, 6)


def _rated(
    service: MonitorService, version: str, alias: str, want: tuple[int, float]
) -> Callable[[], bool]:
    return lambda: _feedback(service, version, alias) == want


async def test_feedback_given_to_one_replica_counts_on_every_replica_once(
    nats_url: str, bus: EventBus, replicas: tuple[MonitorService, MonitorService]
) -> None:
    a, b = replicas
    started = _started(f"fb-{uuid.uuid4().hex[:6]}", auto=False, min_feedback=2)
    await bus.publish(ROUTE_CHANGED, started)
    for replica in (a, b):
        await _until(_knows(replica, started.release.release_id))
    stable = _batch(started, "ver_s", "stable", 3)
    candidate = _batch(started, "ver_c", "candidate", 3)
    await bus.publish(METRICS_REQUESTS, stable)
    await bus.publish(METRICS_REQUESTS, candidate)
    for replica in (a, b):
        await _until(_counted(replica, started.alias, "ver_c", 3))

    async with channel(a.address) as ch_a, channel(b.address) as ch_b:
        stub_a = monitor_pb2_grpc.MonitorServiceStub(ch_a)
        stub_b = monitor_pb2_grpc.MonitorServiceStub(ch_b)
        for r in stable.results[:2]:
            await stub_a.SubmitFeedback(
                monitor_pb2.SubmitFeedbackRequest(request_id=r.request_id, score=0.9)
            )
        for r in candidate.results[:2]:
            reply = await stub_a.SubmitFeedback(
                monitor_pb2.SubmitFeedbackRequest(
                    request_id=r.request_id, score=0.2, comment="wrong price"
                )
            )
            assert (reply.version_id, reply.arm, reply.replaced) == ("ver_c", "candidate", False)
        # Read-your-writes on the replica that took the calls: no waiting.
        assert _feedback(a, "ver_c", started.alias) == (2, 0.2)

        # Replica B counts them too: in its stats and in its release analysis.
        await _until(_rated(b, "ver_c", started.alias, (2, 0.2)))
        stats = await stub_b.GetVersionStats(
            monitor_pb2.GetVersionStatsRequest(alias=started.alias, version_id="ver_c")
        )
        assert stats.feedback_count == 2
        assert stats.feedback_mean == pytest.approx(0.2)
        analysis = await stub_b.GetReleaseAnalysis(
            monitor_pb2.GetReleaseAnalysisRequest(alias=started.alias)
        )
        assert analysis.figures["feedback_count"] == 2
        assert analysis.figures["stable_feedback_count"] == 2
        assert analysis.figures["feedback_mean"] == pytest.approx(0.2)
        assert analysis.figures["stable_feedback_mean"] == pytest.approx(0.9)
        feedback_check = {c.name: c for c in analysis.checks}["feedback"]
        assert feedback_check.status == "fail", feedback_check.detail

        # A score given to B for a request rated on A replaces it on both.
        target = candidate.results[0].request_id
        again = await stub_b.SubmitFeedback(
            monitor_pb2.SubmitFeedbackRequest(request_id=target, score=0.5)
        )
        assert again.replaced
        want = (2, round((0.5 + 0.2) / 2, 6))
        for replica in (a, b):
            await _until(_rated(replica, "ver_c", started.alias, want))

    # The first score for that request, delivered again (twice more) after the
    # replacement: counted once, and the later score still holds on both replicas.
    first, second = await _stored_feedback(nats_url, target)
    assert events_pb2.FeedbackSubmitted.FromString(first).score == 0.2
    assert events_pb2.FeedbackSubmitted.FromString(second).score == 0.5
    # A fresh request rated by a copy stored twice: counted once.
    fresh = events_pb2.FeedbackSubmitted.FromString(first)
    fresh.meta.event_id = uuid.uuid4().hex
    fresh.request_id = candidate.results[2].request_id
    fresh.score = 0.8
    await _publish_raw(nats_url, first, times=2)
    await _publish_raw(nats_url, fresh.SerializeToString(), times=2)
    want = (3, round((0.5 + 0.2 + 0.8) / 3, 6))
    for replica in (a, b):
        await _until(_rated(replica, "ver_c", started.alias, want))
    await asyncio.sleep(0.5)  # nothing more (no double counting) arrives later
    assert [_feedback(r, "ver_c", started.alias) for r in (a, b)] == [want, want]
    for replica in (a, b):
        release = replica.monitor.release_for(started.alias)
        assert release is not None
        assert (len(release.candidate.feedback), len(release.stable.feedback)) == (3, 2)


async def test_feedback_without_nats_answers_unavailable(nats_url: str) -> None:
    # NATS at a port where nothing listens: the score must not stay on this replica alone.
    service = MonitorService(_settings(f"nats://127.0.0.1:{_closed_port()}"))
    await service.start()
    try:
        started = _started(f"down-{uuid.uuid4().hex[:6]}", auto=False)
        batch = _batch(started, "ver_s", "stable", 1)
        service.monitor.ingest(batch.results)  # as if the result had come over NATS
        async with channel(service.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitFeedback(
                    monitor_pb2.SubmitFeedbackRequest(
                        request_id=batch.results[0].request_id, score=1.0
                    )
                )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "NATS" in (info.value.details() or "")
        assert _feedback(service, "ver_s", started.alias) == (0, 0.0)
    finally:
        await service.stop()
