"""One trace from a client call, through a gRPC server that publishes an event, to the
NATS consumer that handles it: context rides gRPC metadata, then NATS headers and the
event envelope."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from nats.js.api import DeliverPolicy
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ftops.events.v1 import events_pb2
from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.client import channel
from ftops_runtime.events import ROUTE_CHANGED, new_meta
from ftops_runtime.server import GrpcServer
from ftops_runtime.settings import ServiceSettings

pytestmark = pytest.mark.integration


class _Publisher(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    async def GetVersionStats(self, request: Any, context: Any) -> monitor_pb2.VersionStats:
        event = events_pb2.RouteChanged(meta=new_meta("test", "t"), alias=request.alias)
        await self.bus.publish(ROUTE_CHANGED, event)
        return monitor_pb2.VersionStats(alias=request.alias)


async def test_trace_context_crosses_grpc_and_nats(nats_url: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    # The runtime's tracers come from the global provider; install ours if none is yet.
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another tracer provider was installed first in this process")

    seen: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    alias = f"trace-{uuid.uuid4().hex[:6]}"

    async def handler(event: events_pb2.RouteChanged, delivery: Delivery) -> None:
        if event.alias == alias:
            ctx = trace.get_current_span().get_span_context()
            await seen.put((ctx.trace_id, event.meta.trace.traceparent))

    async with EventBus(nats_url, service="test", instance="tr") as bus:
        bus.subscribe(
            ROUTE_CHANGED, f"tr-{uuid.uuid4().hex[:6]}", handler, deliver_policy=DeliverPolicy.NEW
        )
        await bus.wait_ready(10)
        server = GrpcServer(
            ServiceSettings(grpc_port=0), service_names=["ftops.monitor.v1.MonitorService"]
        )
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(
            _Publisher(bus),  # type: ignore[abstract]  # only GetVersionStats is called
            server.server,
        )
        await server.start()
        try:
            await asyncio.sleep(0.3)
            with tracer.start_as_current_span("client call") as span:
                trace_id = span.get_span_context().trace_id
                async with channel(server.address) as ch:
                    await monitor_pb2_grpc.MonitorServiceStub(ch).GetVersionStats(
                        monitor_pb2.GetVersionStatsRequest(alias=alias)
                    )
            handled_trace_id, traceparent = await asyncio.wait_for(seen.get(), 10)
        finally:
            await server.stop()

    assert handled_trace_id == trace_id
    assert f"{trace_id:032x}" in traceparent
    names = {s.name for s in exporter.get_finished_spans() if s.context.trace_id == trace_id}
    assert {
        "client call",
        "ftops.monitor.v1.MonitorService/GetVersionStats",
        f"publish {ROUTE_CHANGED}",
        f"process {ROUTE_CHANGED}",
    } <= names
