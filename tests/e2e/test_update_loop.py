"""End to end: the five services as separate processes on free ports, real NATS JetStream
and Redis, driven only through public gRPC APIs (gateway, trainer, registry, monitor)
and observed on NATS: train → register → announce → hot-load → canary → promote → rollback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_devstack.demo import ALIAS, EventLog, ask, train
from ftops_devstack.stack import Stack, health_status
from ftops_runtime.client import channel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SERVICE_NAMES = {
    "registry": "ftops.registry.v1.RegistryService",
    "trainer": "ftops.trainer.v1.TrainerService",
    "inference": "ftops.inference.v1.InferenceService",
    "gateway": "ftops.gateway.v1.GatewayService",
    "monitor": "ftops.monitor.v1.MonitorService",
}


async def _reflected_services(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def request() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for resp in stub.ServerReflectionInfo(request()):
            return [s.name for s in resp.list_services_response.service]
    return []


async def _reflected_descriptor(address: str, symbol: str) -> FileDescriptorProto:
    """What a generic client (grpcurl, buf curl) asks for before calling a method."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def request() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)

        async for resp in stub.ServerReflectionInfo(request()):
            raw = resp.file_descriptor_response.file_descriptor_proto[0]
            return FileDescriptorProto.FromString(raw)
    raise AssertionError("no reflection response")


async def test_every_service_is_healthy_and_reflectable(stack: Stack) -> None:
    for name, full_name in SERVICE_NAMES.items():
        address = stack.address(name)
        assert await health_status(address) == health_pb2.HealthCheckResponse.SERVING
        assert await health_status(address, full_name) == health_pb2.HealthCheckResponse.SERVING
        assert full_name in await _reflected_services(address), name
        descriptor = await _reflected_descriptor(address, full_name)
        assert descriptor.package == full_name.rsplit(".", 1)[0]
        assert full_name.rsplit(".", 1)[1] in [s.name for s in descriptor.service]


async def test_bad_input_gets_clear_errors(stack: Stack) -> None:
    async with (
        channel(stack.address("gateway"), api_key=stack.api_key) as gch,
        channel(stack.address("trainer"), api_key=stack.api_key) as tch,
    ):
        gateway = gateway_pb2_grpc.GatewayServiceStub(gch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ask(gateway, "no-such-alias", "hello")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-alias" in (err.value.details() or "")

        trainer = trainer_pb2_grpc.TrainerServiceStub(tch)
        bad = b'{"text": "fine"}\n{"prompt": "broken\n'
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await trainer.SubmitJob(
                trainer_pb2.SubmitJobRequest(
                    spec=trainer_pb2.JobSpec(
                        adapter="bad-data", base_model="tiny-llama", dataset_jsonl=bad
                    )
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "line 2" in (refused.value.details() or "")


async def _route(gateway: gateway_pb2_grpc.GatewayServiceStub) -> gateway_pb2.Route:
    route: gateway_pb2.Route = await gateway.GetRoute(gateway_pb2.GetRouteRequest(alias=ALIAS))
    return route


async def test_train_release_promote_rollback(stack: Stack) -> None:
    from ftops_tinymodel import new_facts

    facts = new_facts()
    lines: list[str] = []
    events = EventLog(lines.append)
    await events.start(stack.nats_url)
    try:
        async with (
            channel(stack.address("trainer"), api_key=stack.api_key) as tch,
            channel(stack.address("gateway"), api_key=stack.api_key) as gch,
            channel(stack.address("monitor"), api_key=stack.api_key) as mch,
            channel(stack.address("registry"), api_key=stack.api_key) as rch,
        ):
            trainer = trainer_pb2_grpc.TrainerServiceStub(tch)
            gateway = gateway_pb2_grpc.GatewayServiceStub(gch)
            monitor = monitor_pb2_grpc.MonitorServiceStub(mch)
            registry = registry_pb2_grpc.RegistryServiceStub(rch)

            # Trained, registered, announced (adapter.ready), hot-loaded (adapter.loaded).
            v1 = await train(trainer, lines.append, facts[:20])
            await events.wait_loaded(v1.version_id)
            v2 = await train(trainer, lines.append, facts[20:], parent=v1.version_id)
            await events.wait_loaded(v2.version_id)
            assert any("adapter.ready" in line and v2.version_id in line for line in lines)

            lineage = await registry.GetLineage(
                registry_pb2.GetLineageRequest(version_id=v2.version_id)
            )
            assert [v.version_id for v in lineage.chain] == [v2.version_id, v1.version_id]
            assert lineage.base_model.name == "tiny-llama"
            assert [v.number for v in lineage.chain] == [2, 1]

            # The hot-loaded versions really differ: v2 learned facts v1 never saw.
            probe = facts[20]
            via_v1 = await ask(gateway, v1.version_id, probe["prompt"])
            via_v2 = await ask(gateway, v2.version_id, probe["prompt"])
            assert via_v2.arm == "direct"
            assert via_v2.text.strip().startswith(probe["completion"].strip())
            assert via_v1.text != via_v2.text

            await gateway.SetRoute(
                gateway_pb2.SetRouteRequest(alias=ALIAS, version_id=v1.version_id)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gateway.StartRelease(
                    gateway_pb2.StartReleaseRequest(alias=ALIAS, candidate_version_id="ver_missing")
                )
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            # Canary at 30%: manual analysis so the test controls when it moves on.
            await gateway.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=ALIAS,
                    candidate_version_id=v2.version_id,
                    steps=[30, 100],
                    analysis=events_pb2.AnalysisSettings(
                        min_requests=5, max_error_rate=0.2, max_latency_ratio=0, auto=False
                    ),
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gateway.StartRelease(
                    gateway_pb2.StartReleaseRequest(alias=ALIAS, candidate_version_id=v2.version_id)
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            route = await _route(gateway)
            assert (route.candidate_version_id, route.candidate_weight) == (v2.version_id, 30)
            arms: dict[str, str] = {}
            for i in range(40):
                resp = await ask(gateway, ALIAS, facts[i % len(facts)]["prompt"])
                arms.setdefault(resp.arm, resp.version_id)
            assert arms == {"stable": v1.version_id, "candidate": v2.version_id}

            # The monitor saw the traffic through metrics.requests on NATS.
            deadline = time.monotonic() + 15
            analysis = await monitor.GetReleaseAnalysis(
                monitor_pb2.GetReleaseAnalysisRequest(alias=ALIAS)
            )
            while analysis.candidate.requests == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                analysis = await monitor.GetReleaseAnalysis(
                    monitor_pb2.GetReleaseAnalysisRequest(alias=ALIAS)
                )
            assert analysis.candidate.requests > 0
            assert analysis.stable.requests > 0

            # Promote to 100% by hand through the gateway (the last step is the final
            # promotion); the monitor follows the gateway's state.
            await gateway.PromoteRelease(
                gateway_pb2.ReleaseCommandRequest(alias=ALIAS, reason="e2e: looks good")
            )
            await _wait_route(gateway, lambda r: r.stable_version_id == v2.version_id)
            route = await _route(gateway)
            assert route.candidate_version_id == ""
            assert route.previous_version_id == v1.version_id
            resp = await ask(gateway, ALIAS, probe["prompt"])
            assert (resp.arm, resp.version_id) == ("stable", v2.version_id)

            # Roll back (undo the completed promotion): all traffic to v1 again.
            await gateway.RollbackRelease(
                gateway_pb2.ReleaseCommandRequest(
                    alias=ALIAS, reason="e2e: rollback", revert_promotion=True
                )
            )
            await _wait_route(gateway, lambda r: r.stable_version_id == v1.version_id)
            resp = await ask(gateway, ALIAS, probe["prompt"])
            assert resp.version_id == v1.version_id
            analysis = await _wait_analysis(monitor, "rolled_back")
            assert analysis.last_reason == "e2e: rollback"

            # The decisions crossed NATS and the registry recorded them once each.
            assert any("release.promote" in line and "final" in line for line in lines)
            assert any("release.rollback" in line for line in lines)
            history = await _wait_history(registry, {"started", "promote", "rollback"})
            assert [d.kind for d in history].count("started") == 1
            releases = await registry.ListReleases(registry_pb2.ListReleasesRequest(alias=ALIAS))
            assert releases.releases[0].state == "rolled_back"
    finally:
        await events.close()
        if lines:
            print("\n".join(lines))


async def _wait_route(
    gateway: gateway_pb2_grpc.GatewayServiceStub, ok: object, timeout: float = 15
) -> None:
    assert callable(ok)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok(await _route(gateway)):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"route did not change in {timeout}s: {await _route(gateway)}")


async def _wait_analysis(
    monitor: monitor_pb2_grpc.MonitorServiceStub, state: str, timeout: float = 15
) -> monitor_pb2.ReleaseAnalysis:
    """The monitor's analysis once it shows the gateway's release ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        analysis: monitor_pb2.ReleaseAnalysis = await monitor.GetReleaseAnalysis(
            monitor_pb2.GetReleaseAnalysisRequest(alias=ALIAS)
        )
        if analysis.state == state or time.monotonic() > deadline:
            assert analysis.state == state, analysis
            return analysis
        await asyncio.sleep(0.1)


async def _wait_history(
    registry: registry_pb2_grpc.RegistryServiceStub, kinds: set[str], timeout: float = 15
) -> list[registry_pb2.ReleaseDecision]:
    deadline = time.monotonic() + timeout
    history: list[registry_pb2.ReleaseDecision] = []
    while time.monotonic() < deadline:
        releases = await registry.ListReleases(registry_pb2.ListReleasesRequest(alias=ALIAS))
        if releases.releases:
            history = list(releases.releases[0].history)
            if kinds <= {d.kind for d in history}:
                return history
        await asyncio.sleep(0.2)
    raise AssertionError(f"release history incomplete: {[d.kind for d in history]}")
