"""The shared gRPC server skeleton over a real socket: health, reflection, error mapping,
auth and graceful shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops_runtime.client import channel
from ftops_runtime.errors import NotFound
from ftops_runtime.interceptors import current_principal
from ftops_runtime.server import GrpcServer
from ftops_runtime.settings import ServiceSettings

pytestmark = pytest.mark.integration
SERVICE = "ftops.monitor.v1.MonitorService"


class _Monitor(monitor_pb2_grpc.MonitorServiceServicer):
    async def GetVersionStats(self, request, context):  # type: ignore[no-untyped-def]
        if request.alias == "crash":
            raise ValueError("secret internals")
        if request.alias != "known":
            raise NotFound(f"alias {request.alias!r} not found")
        return monitor_pb2.VersionStats(alias="known", version_id=current_principal.get().key_id)


@pytest.fixture
def dependency() -> dict[str, bool]:
    return {"up": True}


async def _server(dep: dict[str, bool], keys: str = "") -> GrpcServer:
    settings = ServiceSettings(
        grpc_port=0, api_keys=keys, health_interval_s=0.1, shutdown_grace_s=1
    )

    async def check() -> bool:
        return dep["up"]

    server = GrpcServer(settings, service_names=[SERVICE], checks={"dep": check})
    monitor_pb2_grpc.add_MonitorServiceServicer_to_server(
        _Monitor(),  # type: ignore[abstract]  # only GetVersionStats is exercised
        server.server,
    )
    await server.start()
    return server


async def test_health_follows_dependencies_and_shutdown(dependency: dict[str, bool]) -> None:
    import asyncio

    server = await _server(dependency)
    async with channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        await asyncio.sleep(0.3)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        dependency["up"] = False
        await asyncio.sleep(0.3)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        dependency["up"] = True
        await asyncio.sleep(0.3)
        await server.stop()
    async with channel(server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError):
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)


async def test_health_watch_streams_status_changes(dependency: dict[str, bool]) -> None:
    # Client-side health checking (grpc's healthCheckConfig) and some load balancers use
    # Watch, a streaming handler that writes with context.write(): the interceptors must
    # pass it through, not treat it as an async generator.
    import asyncio

    server = await _server(dependency)
    try:
        async with channel(server.address) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE)
            )
            seen = []
            async for resp in watch:
                seen.append(resp.status)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    dependency["up"] = False
                if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
            watch.cancel()
            assert health_pb2.HealthCheckResponse.SERVING in seen
            assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
            await asyncio.sleep(0)
    finally:
        await server.stop()


async def test_reflection_lists_services(dependency: dict[str, bool]) -> None:
    server = await _server(dependency)
    try:
        async with channel(server.address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            names = []
            async for resp in stub.ServerReflectionInfo(requests()):
                names = [s.name for s in resp.list_services_response.service]
            assert SERVICE in names
            assert "grpc.health.v1.Health" in names
    finally:
        await server.stop()


async def test_errors_map_to_status_codes(dependency: dict[str, bool]) -> None:
    server = await _server(dependency)
    try:
        async with channel(server.address) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetVersionStats(monitor_pb2.GetVersionStatsRequest(alias="nope"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "'nope'" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetVersionStats(monitor_pb2.GetVersionStatsRequest(alias="crash"))
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in (err.value.details() or "")
    finally:
        await server.stop()


async def test_rpc_durations_are_recorded_as_metrics(dependency: dict[str, bool]) -> None:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    # The runtime's instruments are created through the API's proxy meter, which binds to
    # whichever provider is installed first; nothing else in the test process installs one.
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    server = await _server(dependency)
    try:
        async with channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await monitor_pb2_grpc.MonitorServiceStub(ch).GetVersionStats(
                    monitor_pb2.GetVersionStatsRequest(alias="missing")
                )
    finally:
        await server.stop()
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        point.attributes
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "rpc.server.duration"
        for point in metric.data.data_points
    ]
    assert {
        "rpc.method": f"{SERVICE}/GetVersionStats",
        "rpc.grpc.status_code": "NOT_FOUND",
    } in [dict(p or {}) for p in points]


async def test_api_key_hook(dependency: dict[str, bool]) -> None:
    server = await _server(dependency, keys="k1,k2")
    try:
        async with channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await monitor_pb2_grpc.MonitorServiceStub(ch).GetVersionStats(
                    monitor_pb2.GetVersionStatsRequest(alias="known")
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health stays reachable without a key (load balancers, probes).
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        async with channel(server.address, api_key="k2") as ch:
            resp = await monitor_pb2_grpc.MonitorServiceStub(ch).GetVersionStats(
                monitor_pb2.GetVersionStatsRequest(alias="known")
            )
            assert resp.version_id not in {"", "anonymous"}
    finally:
        await server.stop()


async def test_health_list_answers_every_service(dependency: dict[str, bool]) -> None:
    # Reflection advertises List; grpc's own servicer raised NotImplementedError there,
    # which answered INTERNAL and logged a traceback per call.
    import asyncio

    server = await _server(dependency)
    try:
        async with channel(server.address) as ch:
            await asyncio.sleep(0.3)
            listed = await health_pb2_grpc.HealthStub(ch).List(
                health_pb2.HealthListRequest(), timeout=5
            )
        assert {name: s.status for name, s in listed.statuses.items()} == {
            "": health_pb2.HealthCheckResponse.SERVING,
            SERVICE: health_pb2.HealthCheckResponse.SERVING,
        }
    finally:
        await server.stop()


async def test_runtime_stats_describe_the_process(dependency: dict[str, bool]) -> None:
    import asyncio
    import os

    from ftops.common.v1 import runtime_pb2, runtime_pb2_grpc

    server = await _server(dependency)
    try:
        async with channel(server.address) as ch:
            stub = runtime_pb2_grpc.RuntimeServiceStub(ch)
            before = await stub.GetRuntimeStats(runtime_pb2.GetRuntimeStatsRequest())
            # Ten tasks more on the server's loop (this test's own loop: same process).
            hold = asyncio.Event()
            extra = [asyncio.create_task(hold.wait()) for _ in range(10)]
            after = await stub.GetRuntimeStats(runtime_pb2.GetRuntimeStatsRequest())
            hold.set()
            await asyncio.gather(*extra)
        assert before.service == "monitor"
        assert before.pid == os.getpid()
        assert before.rss_bytes > 10 * 1024 * 1024
        assert before.open_fds > 3  # stdio, the listening socket, the epoll fd
        assert before.threads >= 1
        assert after.asyncio_tasks >= before.asyncio_tasks + 10
        assert after.uptime_s >= before.uptime_s > 0
    finally:
        await server.stop()


async def test_runtime_stats_need_a_key_where_keys_are_set(dependency: dict[str, bool]) -> None:
    from ftops.common.v1 import runtime_pb2, runtime_pb2_grpc

    server = await _server(dependency, keys="k1")
    try:
        async with channel(server.address) as ch:
            stub = runtime_pb2_grpc.RuntimeServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetRuntimeStats(runtime_pb2.GetRuntimeStatsRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A static key is no platform admin: process internals stay closed to it.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetRuntimeStats(
                    runtime_pb2.GetRuntimeStatsRequest(), metadata=(("authorization", "Bearer k1"),)
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop()
