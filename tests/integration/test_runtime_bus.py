"""The event bus against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import uuid

import nats
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from ftops.events.v1 import events_pb2
from ftops_runtime.bus import Delivery, EventBus, ensure_streams
from ftops_runtime.errors import PermanentEventError
from ftops_runtime.events import ADAPTER_LOADED, ADAPTER_READY, new_meta

pytestmark = pytest.mark.integration


def _ready_event(version: str) -> events_pb2.AdapterReady:
    return events_pb2.AdapterReady(meta=new_meta("test", "t1"), version_id=version, adapter="a")


async def _dead_letters(nats_url: str, subject: str, n: int) -> list[Msg]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            f"deadletter.{subject}", durable=f"dlq-{uuid.uuid4().hex[:6]}"
        )
        return list(await sub.fetch(n, timeout=10))
    finally:
        await nc.close()


async def test_publish_and_consume_with_trace_and_idempotent_publish(nats_url: str) -> None:
    got: list[events_pb2.AdapterReady] = []
    arrived = asyncio.Event()

    async def handler(event: events_pb2.AdapterReady, delivery: Delivery) -> None:
        got.append(event)
        arrived.set()

    async with EventBus(nats_url, service="test", instance="i1") as bus:
        bus.subscribe(
            ADAPTER_READY, f"c-{uuid.uuid4().hex[:6]}", handler, deliver_policy=DeliverPolicy.NEW
        )
        await bus.wait_ready(10)
        await asyncio.sleep(0.3)
        event = _ready_event("ver_1")
        # Same event id twice (a retried publish): JetStream stores it once.
        await bus.publish(ADAPTER_READY, event)
        await bus.publish(ADAPTER_READY, event)
        await asyncio.wait_for(arrived.wait(), 10)
        await asyncio.sleep(0.5)
    assert [e.version_id for e in got] == ["ver_1"]
    assert got[0].meta.event_id == event.meta.event_id
    assert got[0].meta.producer_service == "test"


async def test_failing_handler_is_retried_then_dead_lettered(nats_url: str) -> None:
    attempts: list[int] = []

    async def handler(event: events_pb2.AdapterLoaded, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        raise RuntimeError("boom")

    async with EventBus(
        nats_url, service="test", instance="i2", max_deliver=3, nak_delay_s=0.05
    ) as bus:
        bus.subscribe(
            ADAPTER_LOADED, f"f-{uuid.uuid4().hex[:6]}", handler, deliver_policy=DeliverPolicy.NEW
        )
        await bus.wait_ready(10)
        await asyncio.sleep(0.3)
        marker = uuid.uuid4().hex
        await bus.publish(
            ADAPTER_LOADED, events_pb2.AdapterLoaded(meta=new_meta("test", "i2"), version_id=marker)
        )
        dead = await _dead_letters(nats_url, ADAPTER_LOADED, 1)
    assert attempts == [1, 2, 3]
    assert dead[0].headers is not None
    assert dead[0].headers["Ftops-Original-Subject"] == ADAPTER_LOADED
    assert "boom" in dead[0].headers["Ftops-Reason"]
    assert events_pb2.AdapterLoaded.FromString(dead[0].data).version_id == marker


async def test_malformed_payload_is_dead_lettered_and_does_not_block(nats_url: str) -> None:
    handled: list[str] = []
    done = asyncio.Event()
    subject = "adapter.load_failed"

    async def handler(event: events_pb2.AdapterLoadFailed, delivery: Delivery) -> None:
        if event.reason == "permanent":
            raise PermanentEventError("contradictory event")
        handled.append(event.version_id)
        done.set()

    async with EventBus(nats_url, service="test", instance="i3") as bus:
        bus.subscribe(
            subject, f"m-{uuid.uuid4().hex[:6]}", handler, deliver_policy=DeliverPolicy.NEW
        )
        await bus.wait_ready(10)
        await asyncio.sleep(0.3)
        nc = await nats.connect(nats_url)
        await nc.jetstream().publish(subject, b"\xff\xff not a protobuf")
        await nc.close()
        await bus.publish(
            subject, events_pb2.AdapterLoadFailed(meta=new_meta("t", "i"), reason="permanent")
        )
        await bus.publish(
            subject, events_pb2.AdapterLoadFailed(meta=new_meta("t", "i"), version_id="good")
        )
        await asyncio.wait_for(done.wait(), 10)
        dead = await _dead_letters(nats_url, subject, 2)
    assert handled == ["good"]
    reasons = sorted(m.headers["Ftops-Reason"] for m in dead if m.headers)
    assert reasons[0] == "contradictory event"
    assert reasons[1].startswith("malformed payload")


async def test_bus_waits_for_unreachable_nats_without_crashing() -> None:
    from ftops_devstack.servers import free_port, start_nats

    port = free_port()
    bus = EventBus(f"nats://127.0.0.1:{port}", service="test", instance="i4")
    await bus.start()
    await asyncio.sleep(0.5)
    assert not bus.ready
    server = start_nats(port)
    try:
        await bus.wait_ready(15)
        assert bus.ready
    finally:
        await bus.close()
        server.stop()


async def test_streams_get_the_configured_replica_count(nats_url: str) -> None:
    # One server here: 1 copy is what it can hold, and a request for 3 is refused by the
    # server (a 3-node cluster accepts it) rather than silently kept at 1.
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, replicas=1)
        info = await js.stream_info("FTOPS_ADAPTER")
        assert info.config.num_replicas == 1
        with pytest.raises(nats.js.errors.APIError):
            await ensure_streams(js, replicas=3)
        assert (await js.stream_info("FTOPS_ADAPTER")).config.num_replicas == 1
    finally:
        await nc.close()


async def test_a_durable_takes_the_settings_of_the_replica_binding_now(nats_url: str) -> None:
    # A consumer outlives the replica that created it: a later one configured differently
    # (here a shorter ack wait) must not inherit the old settings.
    durable = f"settings-{uuid.uuid4().hex[:8]}"

    async def handler(event: events_pb2.AdapterReady, delivery: Delivery) -> None:
        pass

    for ack_wait_s in (30.0, 3.0):
        bus = EventBus(nats_url, service="test", instance="i")
        bus.subscribe(ADAPTER_READY, durable, handler, ack_wait_s=ack_wait_s)
        await bus.start()
        await bus.wait_ready(10)
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for _ in range(100):
                try:
                    info = await js.consumer_info("FTOPS_ADAPTER", durable)
                    if info.config.ack_wait == ack_wait_s:
                        break
                except nats.js.errors.NotFoundError:
                    pass
                await asyncio.sleep(0.05)
            assert info.config.ack_wait == ack_wait_s
        finally:
            await nc.close()
            await bus.close()


async def test_a_backlog_is_consumed_whole_and_in_order(nats_url: str) -> None:
    """Events queued before the consumer starts come in batches sized by what is queued,
    then single events as they arrive: none lost, none reordered."""
    durable = f"c-{uuid.uuid4().hex[:6]}"
    got: list[str] = []
    done = asyncio.Event()

    async def handler(event: events_pb2.AdapterReady, delivery: Delivery) -> None:
        got.append(event.version_id)
        if len(got) == 45:
            done.set()

    async with EventBus(nats_url, service="test", instance="i1") as bus:
        await bus.wait_ready(10)
        # The durable exists from now on; events published next are its backlog.
        bus.subscribe(ADAPTER_READY, durable, handler, deliver_policy=DeliverPolicy.NEW, batch=8)
        await asyncio.sleep(0.3)
        backlog = [f"ver_b{i}" for i in range(40)]
        for version in backlog:
            await bus.publish(ADAPTER_READY, _ready_event(version))
        for i in range(5):
            await asyncio.sleep(0.05)
            await bus.publish(ADAPTER_READY, _ready_event(f"ver_l{i}"))
        await asyncio.wait_for(done.wait(), 15)
    mine = [v for v in got if v.startswith("ver_b") or v.startswith("ver_l")]
    assert mine == backlog + [f"ver_l{i}" for i in range(5)]
