"""Two monitor replicas on one JetStream: each sees every request result, both judge a
release on the same evidence, and their identical decision is stored once."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import nats.errors
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from ftops.events.v1 import events_pb2
from ftops_monitor.analysis import DecisionKind
from ftops_monitor.service import MonitorService
from ftops_monitor.settings import MonitorSettings
from ftops_runtime.bus import EventBus
from ftops_runtime.events import METRICS_REQUESTS, RELEASE_ROLLBACK, RELEASE_STARTED, new_meta

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


async def _monitor(nats_url: str, instance_id: str = "") -> MonitorService:
    settings = MonitorSettings(
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
    service = MonitorService(settings)
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


def _started(alias: str, **analysis: Any) -> events_pb2.ReleaseStarted:
    settings: dict[str, Any] = {"min_requests": 10, "max_error_rate": 0.1, "auto": True}
    settings.update(analysis)
    return events_pb2.ReleaseStarted(
        meta=new_meta("gateway", "test"),
        release_id=f"rel_{uuid.uuid4().hex[:8]}",
        alias=alias,
        stable_version_id="ver_s",
        candidate_version_id="ver_c",
        strategy=events_pb2.RELEASE_STRATEGY_CANARY,
        steps=[10, 50, 100],
        current_weight=10,
        analysis=events_pb2.AnalysisSettings(**settings),
    )


def _batch(
    started: events_pb2.ReleaseStarted, version: str, arm: str, n: int, status: str = "OK"
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
            release_id=started.release_id,
        )
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


async def _stored(nats_url: str, subject: str, release_id: str) -> list[events_pb2.ReleaseRollback]:
    """Every message the stream holds on ``subject`` for the release (an ephemeral
    consumer from the stream's start)."""
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
                event = events_pb2.ReleaseRollback.FromString(msg.data)
                if event.release_id == release_id:
                    found.append(event)
                await msg.ack()
        return found
    finally:
        await nc.close()


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
    await bus.publish(RELEASE_STARTED, started)
    for replica in (a, b):
        await _until(_knows(replica, started.release_id))
    await bus.publish(METRICS_REQUESTS, _batch(started, "ver_s", "stable", 30))
    await bus.publish(METRICS_REQUESTS, _batch(started, "ver_c", "candidate", 12, "UNAVAILABLE"))
    for replica in (a, b):
        await _until(_counted(replica, started.alias, "ver_c", 12))

    # Concurrently, as their loops would: each takes the decision and publishes it.
    made = await asyncio.gather(a.monitor.analyze_once(), b.monitor.analyze_once())
    assert [[d.kind for d in m] for m in made] == [[DecisionKind.ROLLBACK]] * 2
    for replica in (a, b):
        assert replica.monitor.decisions_total[(started.alias, "rollback")] == 1
        assert replica.monitor.analysis(started.alias).state == "rolled_back"

    [stored] = await _stored(nats_url, RELEASE_ROLLBACK, started.release_id)
    assert stored.candidate_version_id == "ver_c"
    assert "error rate above the cap" in stored.reason
    # Each replica's own event came back with the same id: nothing changes.
    await asyncio.sleep(0.5)
    assert [r.monitor.analysis(started.alias).state for r in (a, b)] == ["rolled_back"] * 2


async def test_replicas_running_free_store_one_rollback(
    nats_url: str, bus: EventBus, replicas: tuple[MonitorService, MonitorService]
) -> None:
    a, b = replicas
    started = _started(f"free-{uuid.uuid4().hex[:6]}")
    await bus.publish(RELEASE_STARTED, started)
    for replica in (a, b):
        await _until(_knows(replica, started.release_id))
    await bus.publish(METRICS_REQUESTS, _batch(started, "ver_s", "stable", 30))
    await bus.publish(METRICS_REQUESTS, _batch(started, "ver_c", "candidate", 12, "UNAVAILABLE"))

    def rolled_back(service: MonitorService) -> Callable[[], bool]:
        return lambda: service.monitor.analysis(started.alias).state == "rolled_back"

    for replica in (a, b):
        await _until(rolled_back(replica))
    await asyncio.sleep(0.5)  # a late second decision would be stored by now
    assert len(await _stored(nats_url, RELEASE_ROLLBACK, started.release_id)) == 1


async def test_a_restarted_replica_rebuilds_release_state(nats_url: str, bus: EventBus) -> None:
    # A restarted container keeps its FTOPS_INSTANCE_ID (the pod's name in Kubernetes): its
    # consumers must still replay the release history into the new process's empty state.
    instance = f"mon-{uuid.uuid4().hex[:6]}"
    first = await _monitor(nats_url, instance)
    started = _started(f"restart-{uuid.uuid4().hex[:6]}", auto=False)
    try:
        await bus.publish(RELEASE_STARTED, started)
        await _until(_knows(first, started.release_id))
    finally:
        await first.stop()
    second = await _monitor(nats_url, instance)
    try:
        await _until(_knows(second, started.release_id))
    finally:
        await second.stop()
