"""The gateway under load over real gRPC, Redis and NATS: a request a full replica refuses
is answered by another replica (echo backends), and a mirror refused for capacity is not
reported as a result while one the candidate failed is (fake inference)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from test_gateway_service import (  # type: ignore[import-not-found]
    FakeInference,
    FakeRegistry,
    Fakes,
    _alias,
    _collect,
    _fake_server,
    _gateway,
    _settings,
    _until,
    bus,
)
from test_inference_replica import Replica, start_replica  # type: ignore[import-not-found]

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.registry.v1 import registry_pb2_grpc
from ftops_gateway.service import GatewayService
from ftops_runtime.bus import EventBus
from ftops_runtime.client import channel
from ftops_runtime.events import METRICS_REQUESTS

pytestmark = pytest.mark.integration
__all__ = ["bus", "start_replica"]  # fixtures shared with other modules


async def test_a_request_a_full_replica_refuses_is_answered_by_another(
    nats_url: str, redis_url: str, start_replica: Callable[..., Any], bus: EventBus
) -> None:
    # A replica with one slot and no queue, held by a slow stream; another with room.
    full: Replica = await start_replica(
        backend="echo",
        echo_token_delay_ms=300,
        max_concurrent_requests=1,
        max_queue_length=0,
        max_queue_wait_s=0,
    )
    roomy: Replica = await start_replica(backend="echo")
    held = full.stub.GenerateStream(
        inference_pb2.GenerateRequest(
            prompt="a b c d e f g h", sampling=common_pb2.SamplingParams()
        )
    )
    await held.read()
    metrics = await _collect(bus, METRICS_REQUESTS)
    servers = SimpleNamespace(registry=full.service.settings.registry_address, inference="")
    settings = _settings(
        nats_url,
        redis_url,
        servers,
        # The full replica first: picked first while both have nothing outstanding.
        inference_endpoints=f"{full.service.address},{roomy.service.address}",
    )
    gw: GatewayService = await _gateway(settings)
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            reply = await stub.Generate(
                gateway_pb2.GenerateRequest(model="base", prompt="hello there", request_id="cap-1")
            )
        assert reply.text.startswith("hello")
        await _until(
            lambda: any(r.request_id == "cap-1" for b in metrics.events for r in b.results)
        )
        result = next(r for b in metrics.events for r in b.results if r.request_id == "cap-1")
        assert (result.status, result.retried, result.failure_origin) == ("OK", True, "")
        # Named by its id once its announcement is in, by its address before.
        assert result.replica_id in (roomy.service.settings.instance_id, roomy.service.address)
        refusing = gw.pool.get(full.service.address)
        assert refusing is not None
        assert refusing.ejected_at is None  # busy, not broken
    finally:
        held.cancel()
        await gw.stop()


class BusyCandidate(FakeInference):  # type: ignore[misc]
    """Refuses best-effort requests for prompts starting "busy" (a replica at capacity);
    fails the candidate's for prompts starting "fail" (the version's own error)."""

    def __init__(self) -> None:
        super().__init__()
        self.priorities: list[tuple[str, int]] = []
        # Set: every request is refused for capacity with this retry advice (ms).
        self.full_for_ms = ""

    async def Generate(self, request: Any, context: Any) -> inference_pb2.GenerateResponse:
        self.priorities.append((request.version_id, request.priority))
        if self.full_for_ms:
            context.set_trailing_metadata((("retry-after-ms", self.full_for_ms),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        if request.priority == inference_pb2.REQUEST_PRIORITY_BEST_EFFORT:
            if request.prompt.startswith("busy"):
                context.set_trailing_metadata((("retry-after-ms", "50"),))
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "best-effort refused")
            if request.prompt.startswith("fail"):
                await context.abort(grpc.StatusCode.INTERNAL, "candidate broke")
        reply: inference_pb2.GenerateResponse = await super().Generate(request, context)
        return reply


@pytest.fixture
async def busy_fakes() -> AsyncIterator[Fakes]:
    impl = BusyCandidate()
    registry = FakeRegistry()
    reg_server, reg = await _fake_server(
        lambda s: registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, s)
    )
    inf_server, inf = await _fake_server(
        lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(impl, s)
    )
    yield Fakes(reg, inf, impl, registry, [reg_server, inf_server])
    for server in (reg_server, inf_server):
        await server.stop(0)


async def test_a_mirror_refused_for_capacity_is_not_reported(
    nats_url: str, redis_url: str, busy_fakes: Fakes, bus: EventBus
) -> None:
    metrics = await _collect(bus, METRICS_REQUESTS)
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, busy_fakes))
    alias = _alias()

    def results() -> list[events_pb2.RequestResult]:
        return [r for b in metrics.events for r in b.results if r.alias == alias]

    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            # Blue-green: every stable request is mirrored to the candidate.
            await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=alias,
                    candidate_version_id="ver_c",
                    strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN,
                )
            )
            prompts = [f"busy {i}" for i in range(6)] + [f"fail {i}" for i in range(3)]
            for prompt in prompts:
                reply = await stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt=prompt))
                assert (reply.arm, reply.text) == ("stable", f"[ver_s] {prompt}")
                # Past the pause a refused mirror asks for (50 ms): the next one is sent.
                await asyncio.sleep(0.12)
        await _until(lambda: sum(not r.shadow for r in results()) == len(prompts))
        await _until(lambda: sum(r.shadow for r in results()) >= 3)
        await asyncio.sleep(0.5)  # any mirror result still on its way
        shadows = [r for r in results() if r.shadow]
        # Only the mirrors the candidate served: its own failures, never the refusals.
        assert len(shadows) == 3
        assert {(r.status, r.failure_origin) for r in shadows} == {("INTERNAL", "replica")}
        assert {r.failure_origin for r in results() if not r.shadow} == {""}
        assert gw.shadow.not_served == 6
        # Mirrors went as best-effort; the user requests did not.
        best_effort = inference_pb2.REQUEST_PRIORITY_BEST_EFFORT
        sent = busy_fakes.inference_impl.priorities
        assert sorted(set(sent)) == [("ver_c", best_effort), ("ver_s", 0)]
        assert sent.count(("ver_c", best_effort)) == len(prompts)
    finally:
        await gw.stop()


async def test_refusals_tell_grpc_clients_how_long_to_wait(
    nats_url: str, redis_url: str, busy_fakes: Fakes
) -> None:
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, busy_fakes))
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            # The only replica refuses for capacity, with its retry advice.
            busy_fakes.inference_impl.full_for_ms = "1500"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(gateway_pb2.GenerateRequest(model="ver_s", prompt="x"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(refused.value.trailing_metadata() or ())["retry-after-ms"] == "1500"
    finally:
        await gw.stop()
