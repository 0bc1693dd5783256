"""Two installations on one NATS and one Redis, in different namespaces (FTOPS_NAMESPACE):
each one's routes, releases and replica announcements stay invisible to the other's
gateway and monitor, even for the same alias."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats
import pytest
from nats.js.api import DeliverPolicy
from test_gateway_service import (  # type: ignore[import-not-found]
    FakeInference,
    Fakes,
    _alias,
    _fake_server,
    _gateway,
    _settings,
    _until,
    fakes,
)

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops.inference.v1 import inference_pb2_grpc
from ftops_gateway.service import GatewayService
from ftops_monitor.service import MonitorService
from ftops_monitor.settings import MonitorSettings
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.errors import PermanentEventError
from ftops_runtime.events import ADAPTER_RETIRED, new_meta, replica_subject

pytestmark = pytest.mark.integration
__all__ = ["fakes"]  # the fixture shared with test_gateway_service


@dataclass
class Installation:
    namespace: str
    gateway: GatewayService
    monitor: MonitorService
    bus: EventBus


async def _installation(
    namespace: str, nats_url: str, redis_url: str, fakes: Fakes
) -> Installation:
    gateway = await _gateway(_settings(nats_url, redis_url, fakes, namespace=namespace))
    monitor = MonitorService(
        MonitorSettings(
            grpc_port=0,
            nats_url=nats_url,
            namespace=namespace,
            instance_id=f"mon-{uuid.uuid4().hex[:6]}",
            registry_address=fakes.registry,
            metrics_port=-1,
            analysis_interval_s=0.1,
            shutdown_grace_s=0.5,
            auth_mode="disabled",
        )
    )
    await monitor.start()
    await monitor.bus.wait_ready(10)
    bus = EventBus(nats_url, service="test", instance=uuid.uuid4().hex[:6], namespace=namespace)
    await bus.start()
    await bus.wait_ready(10)
    return Installation(namespace, gateway, monitor, bus)


@pytest.fixture
async def two(
    nats_url: str, redis_url: str, fakes: Fakes
) -> AsyncIterator[tuple[Installation, Installation]]:
    suffix = uuid.uuid4().hex[:6]
    a = await _installation(f"team-a-{suffix}", nats_url, redis_url, fakes)
    b = await _installation(f"team-b-{suffix}", nats_url, redis_url, fakes)
    await asyncio.sleep(0.3)  # every consumer exists before anything is published
    yield a, b
    for side in (a, b):
        await side.gateway.stop()
        await side.monitor.stop()
        await side.bus.close()


async def test_the_same_alias_routes_to_each_installations_own_version(
    two: tuple[Installation, Installation],
) -> None:
    a, b = two
    alias = _alias()
    await a.gateway.releases.set_route(alias, "ver_s")
    await b.gateway.releases.set_route(alias, "ver_c")
    request = gateway_pb2.GenerateRequest(model=alias, prompt="x")
    assert (await a.gateway.gateway.generate(request)).version_id == "ver_s"
    assert (await b.gateway.gateway.generate(request)).version_id == "ver_c"
    # In Redis under each namespace's prefix; nothing under the unprefixed key.
    redis = a.gateway.redis
    assert await redis.exists(f"{a.namespace}:ftops:route:{alias}")
    assert await redis.exists(f"{b.namespace}:ftops:route:{alias}")
    assert not await redis.exists(f"ftops:route:{alias}")


async def test_a_release_reaches_only_its_own_installations_gateway_and_monitor(
    two: tuple[Installation, Installation],
) -> None:
    a, b = two
    alias = _alias()
    await a.gateway.releases.set_route(alias, "ver_s")
    await b.gateway.releases.set_route(alias, "ver_s")
    await _until(lambda: b.gateway.routes.get(alias) is not None)
    await a.gateway.releases.start_release(
        gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c", steps=[50, 100])
    )
    await _until(lambda: a.monitor.monitor.release_for(alias) is not None)
    await _until(lambda: (r := a.gateway.routes.get(alias)) is not None and r.candidate_weight > 0)
    await asyncio.sleep(0.5)  # what reached a's services had time to reach b's as well
    assert b.monitor.monitor.release_for(alias) is None
    route_b = b.gateway.routes.get(alias)
    assert route_b is not None
    assert (route_b.stable_version_id, route_b.candidate_version_id) == ("ver_s", "")


async def test_a_replica_announced_in_one_namespace_is_unknown_to_the_other(
    two: tuple[Installation, Installation],
) -> None:
    a, b = two
    impl = FakeInference()
    server, address = await _fake_server(
        lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(impl, s)
    )
    replica = f"r-{uuid.uuid4().hex[:6]}"
    announce = events_pb2.ReplicaAnnounce(
        meta=new_meta("inference", replica),
        replica_id=replica,
        endpoint=address,
        serving=True,
        reason="start",
        heartbeat_interval_s=5.0,
        backend="echo",
    )
    try:
        await a.bus.publish(replica_subject(replica), announce)
        await _until(lambda: a.gateway.pool.get(address) is not None)
        await asyncio.sleep(0.5)
        assert b.gateway.pool.get(address) is None
    finally:
        announce.serving, announce.reason = False, "stop"
        await a.bus.publish(replica_subject(replica), announce)
        await server.stop(0)


async def test_the_bus_maps_subjects_streams_and_dead_letters_into_its_namespace(
    nats_url: str,
) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:6]}"
    seen: dict[str, list[tuple[str, str]]] = {"ns": [], "plain": []}

    def recorder(key: str, refuse: bool = False) -> Any:
        async def handle(event: events_pb2.AdapterRetired, delivery: Delivery) -> None:
            seen[key].append((event.meta.event_id, delivery.subject))
            if refuse:
                raise PermanentEventError("refused by the test")

        return handle

    async with (
        EventBus(nats_url, service="test", instance="n1", namespace=namespace) as ns_bus,
        EventBus(nats_url, service="test", instance="n2") as plain_bus,
    ):
        await ns_bus.wait_ready(10)
        await plain_bus.wait_ready(10)
        for key, bus in (("ns", ns_bus), ("plain", plain_bus)):
            bus.subscribe(
                ADAPTER_RETIRED,
                f"t-{uuid.uuid4().hex[:8]}",
                recorder(key, refuse=key == "ns"),
                deliver_policy=DeliverPolicy.NEW,
            )
        await asyncio.sleep(0.3)
        mine = events_pb2.AdapterRetired(meta=new_meta("test", "n1"), version_id="ver_ns")
        theirs = events_pb2.AdapterRetired(meta=new_meta("test", "n2"), version_id="ver_plain")
        await ns_bus.publish(ADAPTER_RETIRED, mine)
        await plain_bus.publish(ADAPTER_RETIRED, theirs)
        await _until(lambda: bool(seen["ns"]) and bool(seen["plain"]))
        await asyncio.sleep(0.3)
        # Each sees only its own event, under the subject services know (no prefix).
        assert seen["ns"] == [(mine.meta.event_id, ADAPTER_RETIRED)]
        assert seen["plain"] == [(theirs.meta.event_id, ADAPTER_RETIRED)]
        # The refused event went to the namespace's own dead letters.
        dead_subject = f"deadletter.{ADAPTER_RETIRED}"
        dead = await ns_bus.stored(dead_subject, events_pb2.AdapterRetired)
        assert [e.meta.event_id for e in dead] == [mine.meta.event_id]
        plain_dead = await plain_bus.stored(dead_subject, events_pb2.AdapterRetired)
        assert mine.meta.event_id not in [e.meta.event_id for e in plain_dead]

    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(f"{namespace}_FTOPS_ADAPTER")
        assert info.config.subjects == [f"{namespace}.adapter.>"]
    finally:
        await nc.close()
