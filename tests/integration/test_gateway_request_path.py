"""The gateway's request path over real gRPC, Redis and NATS: flag rules and the sticky
split from request fields and headers, fallback and retry marks in the reported results,
replica choice from announcements, and how fast a route change reaches every replica."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from test_gateway_service import (  # type: ignore[import-not-found]
    FakeInference,
    Fakes,
    _alias,
    _collect,
    _fake_server,
    _gateway,
    _settings,
    _until,
    bus,
    fakes,
)

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2_grpc
from ftops_devstack.servers import free_port
from ftops_gateway.service import GatewayService
from ftops_runtime.bus import EventBus
from ftops_runtime.client import channel
from ftops_runtime.errors import FtopsError
from ftops_runtime.events import METRICS_REQUESTS, RELEASE_PROMOTE, new_meta, replica_subject

pytestmark = pytest.mark.integration
__all__ = ["bus", "fakes"]  # fixtures shared with test_gateway_service


async def test_flag_rules_and_sticky_users_from_fields_and_headers(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    metrics = await _collect(bus, METRICS_REQUESTS)
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=alias,
                    candidate_version_id="ver_c",
                    steps=[20, 100],
                    sticky=True,
                    flags=[
                        events_pb2.FlagRule(name="staff", tenants=["internal"]),
                        events_pb2.FlagRule(name="team-x", metadata={"team": "x"}),
                        events_pb2.FlagRule(name="vip-out", users=["vip"], arm="stable"),
                    ],
                )
            )

            async def arm(**fields: Any) -> str:
                headers = fields.pop("headers", ())
                reply = await stub.Generate(
                    gateway_pb2.GenerateRequest(model=alias, prompt="x", **fields),
                    metadata=headers,
                )
                return str(reply.arm)

            assert await arm(tenant="internal") == "candidate"
            assert await arm(headers=(("x-ftops-tenant", "internal"),)) == "candidate"
            assert await arm(metadata={"team": "x"}) == "candidate"
            assert await arm(headers=(("x-ftops-meta-team", "x"),)) == "candidate"
            assert await arm(tenant="internal", user="vip") == "candidate"  # first match wins
            users = [f"u{i}" for i in range(60)]
            first = {u: await arm(user=u) for u in users}
            again = {u: await arm(headers=(("x-ftops-user", u),)) for u in users}
            assert first == again  # the same user stays on its arm
            assert 0 < sum(a == "candidate" for a in first.values()) < len(users)

        def flagged() -> set[str]:
            return {r.flag for b in metrics.events for r in b.results if r.alias == alias}

        await _until(lambda: {"staff", "team-x"} <= flagged())
    finally:
        await gw.stop()


async def test_results_mark_fallback_and_retry(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    metrics = await _collect(bus, METRICS_REQUESTS)
    dead = f"127.0.0.1:{free_port()}"
    gw: GatewayService = await _gateway(
        _settings(nats_url, redis_url, fakes, inference_endpoints=f"{dead},{fakes.inference}")
    )
    alias = _alias()
    try:
        await gw.releases.set_route(alias, "ver_s")
        await gw.releases.start_release(
            gateway_pb2.StartReleaseRequest(
                alias=alias, candidate_version_id="ver_bad", steps=[100]
            )
        )
        reply = await gw.gateway.generate(gateway_pb2.GenerateRequest(model=alias, prompt="x"))
        assert (reply.arm, reply.version_id) == ("stable", "ver_s")

        def results() -> list[events_pb2.RequestResult]:
            return [r for b in metrics.events for r in b.results if r.alias == alias]

        await _until(lambda: len(results()) >= 2)
        failed, answered = results()
        assert (failed.arm, failed.version_id, failed.fallback) == ("candidate", "ver_bad", False)
        assert failed.status == "UNKNOWN"  # the fake raises: grpc reports UNKNOWN
        assert (answered.arm, answered.status, answered.fallback) == ("stable", "OK", True)
        # The dead replica is tried first (ties go to the first known), then the live one;
        # its failure ejected it, so the fallback goes straight to the live one.
        assert (failed.retried, failed.replica_id) == (True, fakes.inference)
        assert (answered.retried, answered.replica_id) == (False, fakes.inference)
    finally:
        await gw.stop()


def _announce(replica: str, endpoint: str, **fields: Any) -> events_pb2.ReplicaAnnounce:
    values: dict[str, Any] = {
        "meta": new_meta("inference", replica),
        "replica_id": replica,
        "endpoint": endpoint,
        "serving": True,
        "reason": "heartbeat",
        "heartbeat_interval_s": 5.0,
        "backend": "echo",
    }
    values.update(fields)
    return events_pb2.ReplicaAnnounce(**values)


async def test_replicas_are_chosen_from_their_announcements(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    impls = [FakeInference(), FakeInference()]
    servers = []
    addresses = []
    for impl in impls:
        server, address = await _fake_server(
            lambda s, impl=impl: inference_pb2_grpc.add_InferenceServiceServicer_to_server(impl, s)
        )
        servers.append(server)
        addresses.append(address)
    r1, r2 = f"r1-{uuid.uuid4().hex[:6]}", f"r2-{uuid.uuid4().hex[:6]}"
    # Announced before the gateway starts: it learns them from the stream's last messages.
    await bus.publish(replica_subject(r1), _announce(r1, addresses[0]))
    gw: GatewayService = await _gateway(
        _settings(nats_url, redis_url, fakes, inference_endpoints="")
    )
    try:
        await _until(lambda: gw.pool.get(addresses[0]) is not None)
        await gw.gateway.generate(gateway_pb2.GenerateRequest(model="ver_c", prompt="x"))
        assert impls[0].calls == ["ver_c"]

        await bus.publish(
            replica_subject(r2), _announce(r2, addresses[1], loaded_versions=["ver_c"])
        )
        await _until(lambda: (e := gw.pool.get(addresses[1])) is not None and "ver_c" in e.loaded)
        for _ in range(3):
            await gw.gateway.generate(gateway_pb2.GenerateRequest(model="ver_c", prompt="x"))
        assert impls[1].calls == ["ver_c"] * 3  # the replica that has it loaded

        await bus.publish(
            replica_subject(r2),
            _announce(r2, addresses[1], loaded_versions=["ver_c"], serving=False, reason="drain"),
        )
        await _until(lambda: gw.pool.get(addresses[1]).serving is False)  # type: ignore[union-attr]
        await gw.gateway.generate(gateway_pb2.GenerateRequest(model="ver_c", prompt="x"))
        assert (len(impls[0].calls), len(impls[1].calls)) == (2, 3)
    finally:
        await gw.stop()
        for server in servers:
            await server.stop(0)
        await bus.publish(
            replica_subject(r1), _announce(r1, addresses[0], serving=False, reason="stop")
        )


async def test_a_version_goes_only_to_replicas_of_its_base_model(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    impls = [FakeInference(), FakeInference()]
    servers, addresses = [], []
    for impl in impls:
        server, address = await _fake_server(
            lambda s, impl=impl: inference_pb2_grpc.add_InferenceServiceServicer_to_server(impl, s)
        )
        servers.append(server)
        addresses.append(address)
    other, tiny = f"other-{uuid.uuid4().hex[:6]}", f"tiny-{uuid.uuid4().hex[:6]}"
    # The replica of another base model is known first and has nothing outstanding.
    await bus.publish(
        replica_subject(other), _announce(other, addresses[0], base_model_fingerprint="fp-other")
    )
    gw: GatewayService = await _gateway(
        _settings(nats_url, redis_url, fakes, inference_endpoints="")
    )
    try:
        await _until(lambda: gw.pool.get(addresses[0]) is not None)
        # (Replicas announced by earlier tests may still look alive and be tried: they fail
        # as UNAVAILABLE too. The point is that the other base's replica is never asked.)
        with pytest.raises(FtopsError) as refused:
            await gw.gateway.generate(gateway_pb2.GenerateRequest(model="ver_c", prompt="x"))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert impls[0].calls == []

        await bus.publish(
            replica_subject(tiny),
            _announce(
                tiny, addresses[1], base_model_fingerprint="fp-tiny", loaded_versions=["ver_c"]
            ),
        )
        await _until(lambda: gw.pool.get(addresses[1]) is not None)
        for _ in range(3):
            await gw.gateway.generate(gateway_pb2.GenerateRequest(model="ver_c", prompt="x"))
        assert (impls[0].calls, impls[1].calls) == ([], ["ver_c"] * 3)
    finally:
        await gw.stop()
        for server in servers:
            await server.stop(0)
        # Gone, as a stopping replica says: later tests' gateways must not try them.
        for replica, address in ((other, addresses[0]), (tiny, addresses[1])):
            await bus.publish(
                replica_subject(replica),
                _announce(replica, address, serving=False, reason="stop"),
            )


async def test_route_change_reaches_every_replica_within_100_ms(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    durable = f"gwrel-{uuid.uuid4().hex[:6]}"
    # A long periodic reload: changes must travel by the announcement on the channel.
    gws: list[GatewayService] = [
        await _gateway(
            _settings(nats_url, redis_url, fakes, releases_durable=durable, route_refresh_s=30)
        )
        for _ in range(2)
    ]
    alias = _alias()
    delays: list[float] = []
    try:
        await gws[0].releases.set_route(alias, "ver_s")
        route = await gws[0].releases.start_release(
            gateway_pb2.StartReleaseRequest(
                alias=alias, candidate_version_id="ver_c", steps=[10, 20, 30, 40, 50, 60, 100]
            )
        )
        await _until(lambda: all(gw.routes.get(alias) is not None for gw in gws))
        for step, weight in enumerate((20, 30, 40, 50, 60), start=1):
            promote = events_pb2.ReleasePromote(
                meta=new_meta("monitor", "t"),
                release_id=route.release_id,
                alias=alias,
                candidate_version_id="ver_c",
                stable_version_id="ver_s",
                step_index=step,
                weight=weight,
            )
            started = time.monotonic()
            await bus.publish(RELEASE_PROMOTE, promote)
            pending = list(gws)
            while pending:
                pending = [
                    gw
                    for gw in pending
                    if (r := gw.routes.get(alias)) is None or r.candidate_weight != weight
                ]
                if pending:
                    await asyncio.sleep(0.002)
                    assert time.monotonic() - started < 2.0, "route change never arrived"
                else:
                    delays.append(time.monotonic() - started)
        # From the decision's publication to the last replica serving the new table.
        assert statistics.median(delays) < 0.1, delays
        assert max(delays) < 0.25, delays
    finally:
        for gw in gws:
            await gw.stop()


async def test_trace_context_reaches_the_inference_replica(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    span = NonRecordingSpan(
        SpanContext(trace_id=0x1234, span_id=0x5678, is_remote=False, trace_flags=TraceFlags(1))
    )
    try:
        with trace.use_span(span):
            await gw.gateway.generate(gateway_pb2.GenerateRequest(model="ver_s", prompt="x"))
        assert fakes.inference_impl.traceparents[-1].startswith(f"00-{0x1234:032x}-")
    finally:
        await gw.stop()
