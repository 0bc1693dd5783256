"""The gateway over real gRPC, Redis and NATS, with fake inference and registry servers.

Also the release loop closed end to end: gateway results -> monitor decision -> gateway
route change."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from nats.js.api import DeliverPolicy

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_devstack.servers import free_port, start_redis
from ftops_gateway.service import GatewayService
from ftops_gateway.settings import GatewaySettings
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.client import channel
from ftops_runtime.events import (
    METRICS_REQUESTS,
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    RELEASE_STARTED,
    ROUTE_CHANGED,
    new_meta,
)

pytestmark = pytest.mark.integration

VERSIONS = {
    "ver_s": "bot:1",
    "ver_c": "bot:2",
    "ver_bad": "bot:3",
    "ver_slow": "bot:4",
    "ver_rej": "bot:5",  # refused by the trainer's evaluation gate
    "ver_other": "other:1",  # an adapter of another base model
}


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self) -> None:
        # Release history as the registry would have recorded it from release.* events.
        self.releases: dict[str, registry_pb2.Release] = {}

    async def GetVersion(self, request: Any, context: Any) -> registry_pb2.Version:
        ref = request.version_id or request.name
        for vid, name in VERSIONS.items():
            if ref in (vid, name):
                adapter, number = name.split(":")
                version = registry_pb2.Version(
                    version_id=vid,
                    adapter=adapter,
                    number=int(number),
                    base_model="other-base" if vid == "ver_other" else "tiny-base",
                    base_model_fingerprint="fp-other" if vid == "ver_other" else "fp-tiny",
                )
                if vid == "ver_rej":
                    version.state = "rejected"
                    version.evaluation.reasons.append("retention 0.80 < 0.95")
                return version
        await context.abort(grpc.StatusCode.NOT_FOUND, f"version {ref!r} not found")
        raise AssertionError

    async def GetRelease(self, request: Any, context: Any) -> registry_pb2.Release:
        if request.release_id in self.releases:
            return self.releases[request.release_id]
        await context.abort(grpc.StatusCode.NOT_FOUND, f"release {request.release_id} not found")
        raise AssertionError

    async def ListReleases(self, request: Any, context: Any) -> registry_pb2.ListReleasesResponse:
        found = [r for r in self.releases.values() if r.alias == request.alias]
        return registry_pb2.ListReleasesResponse(releases=found)


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    """Echoes the version; ``ver_bad`` always fails."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.traceparents: list[str] = []

    def _check(self, version_id: str, context: Any = None) -> None:
        self.calls.append(version_id)
        if context is not None:
            headers = dict(context.invocation_metadata() or ())
            self.traceparents.append(str(headers.get("traceparent", "")))
        if version_id == "ver_bad":
            raise RuntimeError("adapter is broken")

    async def Generate(self, request: Any, context: Any) -> inference_pb2.GenerateResponse:
        self._check(request.version_id, context)
        if request.prompt == "too-long":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is too long")
        return inference_pb2.GenerateResponse(
            request_id=request.request_id,
            version_id=request.version_id,
            text=f"[{request.version_id or 'base'}] {request.prompt}",
            prompt_tokens=3,
            completion_tokens=4,
            finish_reason=common_pb2.FINISH_REASON_EOS,
        )

    async def GenerateStream(
        self, request: Any, context: Any
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        self._check(request.version_id)
        for i, piece in enumerate(["a", "b", "c"], start=1):
            await asyncio.sleep(0.01)
            yield inference_pb2.GenerateChunk(
                request_id=request.request_id,
                version_id=request.version_id,
                text=piece,
                completion_tokens=i,
                prompt_tokens=3,
                finish_reason=common_pb2.FINISH_REASON_LENGTH if i == 3 else 0,  # type: ignore[arg-type]
            )


@dataclass
class Fakes:
    registry: str
    inference: str
    inference_impl: FakeInference
    registry_impl: FakeRegistry
    servers: list[grpc.aio.Server] = field(default_factory=list)


async def _fake_server(add: Callable[[grpc.aio.Server], None]) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    # Only the methods the gateway calls are implemented.
    impl = FakeInference()  # type: ignore[abstract]
    registry = FakeRegistry()  # type: ignore[abstract]
    reg_server, reg = await _fake_server(
        lambda s: registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, s)
    )
    inf_server, inf = await _fake_server(
        lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(impl, s)
    )
    yield Fakes(reg, inf, impl, registry, [reg_server, inf_server])
    for server in (reg_server, inf_server):
        await server.stop(0)


def _settings(nats_url: str, redis_url: str, fakes: Fakes, **extra: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "grpc_port": 0,
        "nats_url": nats_url,
        "redis_url": redis_url,
        "registry_address": fakes.registry,
        "inference_endpoints": fakes.inference,
        "instance_id": f"gw-{uuid.uuid4().hex[:6]}",
        "releases_durable": f"gwrel-{uuid.uuid4().hex[:6]}",
        "metrics_flush_s": 0.1,
        "route_refresh_s": 0.3,
        "health_interval_s": 0.2,
        "shutdown_grace_s": 0.5,
        "auth_mode": "disabled",  # access control has its own tests (test_access_control.py)
    }
    values.update(extra)
    return GatewaySettings(**values)


async def _monitor(nats_url: str, fakes: Fakes) -> Any:
    """A started monitor on the test's NATS and fake registry, judging every 0.1 s."""
    from ftops_monitor.service import MonitorService
    from ftops_monitor.settings import MonitorSettings

    monitor = MonitorService(
        MonitorSettings(
            grpc_port=0,
            nats_url=nats_url,
            instance_id=f"mon-{uuid.uuid4().hex[:6]}",
            registry_address=fakes.registry,
            metrics_port=-1,
            analysis_interval_s=0.1,
            shutdown_grace_s=0.5,
            auth_mode="disabled",  # access control has its own tests (test_access_control.py)
        )
    )
    await monitor.start()
    await monitor.bus.wait_ready(10)
    return monitor


async def _gateway(settings: GatewaySettings) -> GatewayService:
    service = GatewayService(settings)
    await service.start()
    await service.bus.wait_ready(10)
    return service


def _alias() -> str:
    return f"bot-{uuid.uuid4().hex[:6]}"


class Collector:
    """Collects events of one subject from now on."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def handler(self, event: Message, delivery: Delivery) -> None:
        self.events.append(event)

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if predicate(event):
                    return event
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching event in {len(self.events)} received")


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


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
    await asyncio.sleep(0.3)  # the consumer exists before anything is published
    return collector


async def test_release_splits_traffic_and_reports_metrics(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    metrics = await _collect(bus, METRICS_REQUESTS)
    started = await _collect(bus, RELEASE_STARTED)
    gw = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            route = await stub.SetRoute(
                gateway_pb2.SetRouteRequest(alias=alias, version_id="bot:1")
            )
            assert route.stable_version_id == "ver_s"
            route = await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=alias, candidate_version_id="ver_c", steps=[30, 60, 100]
                )
            )
            assert (route.candidate_version_id, route.candidate_weight) == ("ver_c", 30)
            event = await started.wait_for(lambda e: e.alias == alias)
            assert event.release_id == route.release_id
            assert list(event.steps) == [30, 60, 100]
            assert event.analysis.min_requests == 20
            assert event.analysis.auto

            n = 300
            replies = await asyncio.gather(
                *(
                    stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt=f"p{i}"))
                    for i in range(n)
                )
            )
            share = sum(r.arm == "candidate" for r in replies) / n
            assert 0.2 < share < 0.4, share
            assert {r.version_id for r in replies} == {"ver_s", "ver_c"}
            assert all(r.text.startswith(f"[{r.version_id}]") for r in replies)

            direct = await stub.Generate(gateway_pb2.GenerateRequest(model="bot:2", prompt="x"))
            assert (direct.arm, direct.version_id) == ("direct", "ver_c")
            base = await stub.Generate(gateway_pb2.GenerateRequest(model="base", prompt="x"))
            assert (base.arm, base.version_id, base.text) == ("base", "", "[base] x")
            chunks = [
                c
                async for c in stub.GenerateStream(
                    gateway_pb2.GenerateRequest(model="ver_s", prompt="x", tenant="acme")
                )
            ]
            assert "".join(c.text for c in chunks) == "abc"
            assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH

        def results() -> list[events_pb2.RequestResult]:
            return [r for b in metrics.events for r in b.results]

        await _until(lambda: len(results()) >= n + 3)
        got = results()
        routed = [r for r in got if r.alias == alias]
        assert len(routed) == n
        assert all(r.release_id == route.release_id and r.status == "OK" for r in routed)
        assert max(len(b.results) for b in metrics.events) <= 64
        [streamed] = [r for r in got if r.tenant == "acme"]
        assert streamed.arm == "direct"
        assert streamed.completion_tokens == 3
        assert 0 < streamed.ttft_ms <= streamed.latency_ms
    finally:
        await gw.stop()


async def test_errors_and_preconditions(nats_url: str, redis_url: str, fakes: Fakes) -> None:
    gw = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)

            async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                return info.value.code(), info.value.details() or ""

            code, details = await code_of(
                stub.Generate(gateway_pb2.GenerateRequest(model="ghost-model", prompt="x"))
            )
            assert code == grpc.StatusCode.NOT_FOUND
            assert "ghost-model" in details
            code, details = await code_of(stub.GetRoute(gateway_pb2.GetRouteRequest(alias=alias)))
            assert code == grpc.StatusCode.NOT_FOUND
            assert alias in details
            code, details = await code_of(
                stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_nope"))
            )
            assert (code, "ver_nope" in details) == (grpc.StatusCode.NOT_FOUND, True)
            code, _ = await code_of(
                stub.StartRelease(
                    gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c")
                )
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION

            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            code, details = await code_of(
                stub.StartRelease(
                    gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_nope")
                )
            )
            assert (code, "ver_nope" in details) == (grpc.StatusCode.NOT_FOUND, True)
            code, _ = await code_of(
                stub.StartRelease(
                    gateway_pb2.StartReleaseRequest(
                        alias=alias, candidate_version_id="ver_c", steps=[50, 20]
                    )
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            first = await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c")
            )
            assert list(first.steps) == [5, 25, 50, 100]
            code, details = await code_of(
                stub.StartRelease(
                    gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="bot:4")
                )
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert first.release_id in details
            got = await stub.GetRoute(gateway_pb2.GetRouteRequest(alias=alias))
            assert got.release_id == first.release_id
    finally:
        await gw.stop()


async def test_failing_candidate_is_answered_by_stable_and_counted(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    metrics = await _collect(bus, METRICS_REQUESTS)
    gw = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=alias, candidate_version_id="ver_bad", steps=[100]
                )
            )
            reply = await stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt="x"))
            assert (reply.arm, reply.version_id) == ("stable", "ver_s")
            chunks = [
                c async for c in stub.GenerateStream(gateway_pb2.GenerateRequest(model=alias))
            ]
            assert {c.version_id for c in chunks} == {"ver_s"}

        def seen() -> list[tuple[str, str]]:
            return [
                (r.arm, r.status) for b in metrics.events for r in b.results if r.alias == alias
            ]

        await _until(lambda: len(seen()) >= 4)
        candidate = [status for arm, status in seen() if arm == "candidate"]
        stable = [status for arm, status in seen() if arm == "stable"]
        assert len(candidate) == 2
        assert "OK" not in candidate
        assert stable == ["OK", "OK"]
    finally:
        await gw.stop()


async def test_client_fault_on_candidate_is_not_retried_on_stable(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    gw = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=alias, candidate_version_id="ver_c", steps=[100]
                )
            )
            calls_before = len(fakes.inference_impl.calls)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt="too-long"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The request's own fault: the stable version is not asked to fail it again.
            assert fakes.inference_impl.calls[calls_before:] == ["ver_c"]
    finally:
        await gw.stop()


async def test_unavailable_replica_is_retried_on_another(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    gw = await _gateway(
        _settings(nats_url, redis_url, fakes, inference_endpoints=f"{dead},{fakes.inference}")
    )
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            for _ in range(3):
                reply = await stub.Generate(gateway_pb2.GenerateRequest(model="ver_s", prompt="x"))
                assert reply.version_id == "ver_s"
    finally:
        await gw.stop()


async def _wait_route(
    gw: GatewayService, alias: str, check: Callable[[gateway_pb2.Route], bool], timeout: float
) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        route = gw.routes.get(alias)
        if route is not None and check(route):
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    raise AssertionError(f"route of {alias} on {gw.settings.instance_id}: {gw.routes.get(alias)}")


async def test_promote_event_reaches_every_replica_within_a_second(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    changed = await _collect(bus, ROUTE_CHANGED)
    durable = f"gwrel-{uuid.uuid4().hex[:6]}"
    # A long periodic refresh: the change must travel by the pub/sub announcement.
    gws = [
        await _gateway(
            _settings(nats_url, redis_url, fakes, releases_durable=durable, route_refresh_s=30)
        )
        for _ in range(2)
    ]
    alias = _alias()
    try:
        await gws[0].releases.set_route(alias, "ver_s")
        route = await gws[0].releases.start_release(
            gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c")
        )
        await asyncio.sleep(0.5)  # decision consumers bound

        promote = events_pb2.ReleasePromote(
            meta=new_meta("monitor", "test"),
            release_id=route.release_id,
            alias=alias,
            candidate_version_id="ver_c",
            stable_version_id="ver_s",
            step_index=1,
            weight=25,
        )
        await bus.publish(RELEASE_PROMOTE, promote)
        for gw in gws:
            took = await _wait_route(gw, alias, lambda r: r.candidate_weight == 25, 1.0)
            assert took < 1.0
        event = await changed.wait_for(lambda e: e.cause_event_id == promote.meta.event_id)
        assert dict(event.weights) == {"ver_c": 25, "ver_s": 75}

        # The same event again (redelivery or a re-publish under a new NATS id) is a no-op.
        revision = gws[0].routes.get(alias).revision  # type: ignore[union-attr]
        again = events_pb2.ReleasePromote()
        again.CopyFrom(promote)
        await gws[1].releases.on_promote(again, None)  # type: ignore[arg-type]
        assert (await gws[1].store.get(alias)).revision == revision  # type: ignore[union-attr]

        final = events_pb2.ReleasePromote(
            meta=new_meta("monitor", "test"),
            release_id=route.release_id,
            alias=alias,
            candidate_version_id="ver_c",
            stable_version_id="ver_s",
            step_index=3,
            weight=100,
            final=True,
        )
        await bus.publish(RELEASE_PROMOTE, final)
        for gw in gws:
            await _wait_route(gw, alias, lambda r: r.stable_version_id == "ver_c", 1.0)
        after = gws[1].routes.get(alias)
        assert after is not None
        assert (after.previous_version_id, after.candidate_version_id) == ("ver_s", "")

        # Rolling back the completed promotion restores the previous version.
        rollback = events_pb2.ReleaseRollback(
            meta=new_meta("monitor", "test"),
            release_id=route.release_id,
            alias=alias,
            candidate_version_id="ver_c",
            stable_version_id="ver_s",
            manual=True,
        )
        await bus.publish(RELEASE_ROLLBACK, rollback)
        for gw in gws:
            await _wait_route(gw, alias, lambda r: r.stable_version_id == "ver_s", 1.0)
    finally:
        for gw in gws:
            await gw.stop()


async def test_keeps_serving_from_last_table_when_redis_stops(nats_url: str, fakes: Fakes) -> None:
    redis_server = start_redis()
    stopped = False
    gw = await _gateway(
        _settings(nats_url, redis_server.url, fakes, route_refresh_s=0.2, redis_timeout_s=0.3)
    )
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            redis_server.stop()
            stopped = True
            await asyncio.sleep(0.6)  # a few refreshes fail meanwhile
            assert not gw.routes.last_refresh_ok
            for _ in range(5):
                reply = await asyncio.wait_for(
                    stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt="x")), 2
                )
                assert reply.version_id == "ver_s"
            # It keeps serving from the last table: health stays SERVING, so balancers do
            # not drop every gateway at once while Redis is down.
            assert await gw.server.probe()
    finally:
        await gw.stop()
        if not stopped:
            redis_server.stop()


async def test_monitor_closes_the_loop_with_the_gateway(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    """Gateway results feed the monitor, whose decisions move the gateway's route."""
    gw = await _gateway(_settings(nats_url, redis_url, fakes))
    monitor = await _monitor(nats_url, fakes)
    good, bad = _alias(), _alias()
    try:
        await asyncio.sleep(0.5)
        analysis = events_pb2.AnalysisSettings(min_requests=10, max_error_rate=0.05, auto=True)
        for alias, candidate in ((good, "ver_c"), (bad, "ver_bad")):
            await gw.releases.set_route(alias, "ver_s")
            await gw.releases.start_release(
                gateway_pb2.StartReleaseRequest(
                    alias=alias, candidate_version_id=candidate, steps=[50, 100], analysis=analysis
                )
            )
        await asyncio.sleep(0.3)
        for _ in range(60):
            for alias in (good, bad):
                await gw.gateway.generate(gateway_pb2.GenerateRequest(model=alias, prompt="x"))
        await _wait_route(gw, good, lambda r: r.stable_version_id == "ver_c", 10)
        await _wait_route(gw, bad, lambda r: r.candidate_version_id == "", 10)
        assert gw.routes.get(bad).stable_version_id == "ver_s"  # type: ignore[union-attr]
        # The monitor follows the gateway's route.changed, moments after the route moved.
        for _ in range(100):
            states = (monitor.monitor.analysis(good).state, monitor.monitor.analysis(bad).state)
            if states == ("promoted", "rolled_back"):
                break
            await asyncio.sleep(0.05)
        assert monitor.monitor.analysis(good).state == "promoted"
        assert monitor.monitor.analysis(bad).state == "rolled_back"
    finally:
        await monitor.stop()
        await gw.stop()


async def test_rejected_versions_are_never_routed_or_served(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    gw = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            for call in (
                stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_rej")),
                stub.Generate(gateway_pb2.GenerateRequest(model="bot:5", prompt="x")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "retention 0.80 < 0.95" in (err.value.details() or "")
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.StartRelease(
                    gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_rej")
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ver_rej" not in fakes.inference_impl.calls
    finally:
        await gw.stop()


async def test_monitor_judges_blue_green_and_shadow_on_mirrored_traffic(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    """Blue-green: mirrored answers pass, the monitor's promotion switches 100% at once.
    Shadow: the mirrored candidate fails, the monitor rolls it back; clients never see it."""
    gw = await _gateway(_settings(nats_url, redis_url, fakes))
    monitor = await _monitor(nats_url, fakes)
    green, shadowed = _alias(), _alias()
    try:
        await asyncio.sleep(0.5)  # the monitor's route.changed consumer is bound
        # Sub-millisecond fakes: scheduling noise would dominate a 20% latency effect.
        analysis = events_pb2.AnalysisSettings(min_requests=10, auto=True, latency_effect=1.0)
        for alias, candidate, strategy in (
            (green, "ver_c", events_pb2.RELEASE_STRATEGY_BLUE_GREEN),
            (shadowed, "ver_bad", events_pb2.RELEASE_STRATEGY_SHADOW),
        ):
            await gw.releases.set_route(alias, "ver_s")
            await gw.releases.start_release(
                gateway_pb2.StartReleaseRequest(
                    alias=alias,
                    candidate_version_id=candidate,
                    strategy=strategy,
                    analysis=analysis,
                )
            )
        await asyncio.sleep(0.3)  # route.changed reached the monitor
        for _ in range(60):
            for alias in (green, shadowed):
                reply = await gw.gateway.generate(
                    gateway_pb2.GenerateRequest(model=alias, prompt="x")
                )
                assert reply.version_id in ("ver_s", "ver_c")
        await _wait_route(gw, green, lambda r: r.stable_version_id == "ver_c", 10)
        await _wait_route(gw, shadowed, lambda r: r.release_state == "rolled_back", 10)
        switched = gw.routes.get(green)
        assert switched is not None
        assert (switched.previous_version_id, switched.release_state) == ("ver_s", "promoted")
        assert "ver_bad" not in {gw.routes.get(shadowed).stable_version_id}  # type: ignore[union-attr]
    finally:
        await monitor.stop()
        await gw.stop()
