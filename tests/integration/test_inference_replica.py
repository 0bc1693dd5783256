"""A replica's life around its requests, over real NATS and gRPC: announcements (start,
change, heartbeat, drain, stop), adapter.retired, injected faults, drain on shutdown, the
echo backend, and NOT_SERVING after a backend failure until it recovers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.msg import Msg
from test_inference_service import (  # type: ignore[import-not-found]
    FakeRegistry,
    make_adapter,
)

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.registry.v1 import registry_pb2_grpc
from ftops_inference.service import InferenceService
from ftops_inference.settings import InferenceSettings
from ftops_runtime import events, hashing
from ftops_runtime.client import channel

pytestmark = pytest.mark.integration

GREEDY = common_pb2.SamplingParams(max_tokens=8)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("replica") / "a", 3)
    return path


@dataclass
class Replica:
    service: InferenceService
    registry: FakeRegistry
    stub: inference_pb2_grpc.InferenceServiceAsyncStub
    health: health_pb2_grpc.HealthAsyncStub
    announcements: asyncio.Queue[events_pb2.ReplicaAnnounce]
    nc: Any
    chan: Any

    @property
    def fingerprint(self) -> str:
        return self.service.base_fingerprint

    async def next_announcement(
        self, match: Callable[[events_pb2.ReplicaAnnounce], bool], timeout: float = 20
    ) -> events_pb2.ReplicaAnnounce:
        async def wait() -> events_pb2.ReplicaAnnounce:
            while True:
                event = await self.announcements.get()
                if match(event):
                    return event

        return await asyncio.wait_for(wait(), timeout)

    async def health_status(self) -> Any:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(service=""))
        return reply.status


@pytest.fixture
async def start_replica(
    nats_url: str, tiny_model_dir: Path, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Replica] = []
    servers: list[Any] = []

    async def start(registry: FakeRegistry | None = None, **overrides: Any) -> Replica:
        registry = registry or FakeRegistry()
        server = grpc.aio.server()
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        instance = f"replica-{uuid.uuid4().hex[:6]}"
        settings = InferenceSettings(
            **{
                "grpc_host": "127.0.0.1",
                "grpc_port": 0,
                "nats_url": nats_url,
                "instance_id": instance,
                "base_model_path": str(tiny_model_dir),
                "registry_address": f"127.0.0.1:{port}",
                "adapter_cache_dir": str(tmp_path / instance),
                "health_interval_s": 0.1,
                "announce_interval_s": 0.3,
                "auth_mode": "disabled",
                **overrides,
            }
        )
        nc = await nats.connect(nats_url)
        queue: asyncio.Queue[events_pb2.ReplicaAnnounce] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            queue.put_nowait(events_pb2.ReplicaAnnounce.FromString(msg.data))

        await nc.subscribe(events.replica_subject(instance), cb=on_msg)
        service = InferenceService(settings)
        await service.start()
        await asyncio.wait_for(service.wait_ready(), 60)
        chan = channel(service.address)
        replica = Replica(
            service,
            registry,
            inference_pb2_grpc.InferenceServiceStub(chan),  # type: ignore[arg-type]
            health_pb2_grpc.HealthStub(chan),
            queue,
            nc,
            chan,
        )
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.service.stop()
        await replica.chan.close()
        await replica.nc.close()
    for server in servers:
        await server.stop(None)


async def generate(replica: Replica, version: str, prompt: str = "The capital of") -> Any:
    request = inference_pb2.GenerateRequest(version_id=version, prompt=prompt, sampling=GREEDY)
    return await replica.stub.Generate(request, timeout=30)


async def test_announces_start_changes_heartbeats_and_stop(
    start_replica: Callable[..., Any], adapter_dir: Path
) -> None:
    replica: Replica = await start_replica(backend="echo")
    serving = await replica.next_announcement(lambda e: e.serving)
    assert serving.endpoint == replica.service.endpoint
    assert serving.backend == "echo"
    assert serving.base_model_fingerprint == replica.fingerprint
    assert serving.heartbeat_interval_s == pytest.approx(0.3)
    assert serving.max_concurrent == replica.service.settings.max_concurrent_requests

    version = replica.registry.add_version(adapter_dir, replica.fingerprint)
    await replica.stub.LoadAdapter(inference_pb2.LoadAdapterRequest(version_id=version.version_id))
    change = await replica.next_announcement(lambda e: version.version_id in e.loaded_versions)
    assert change.reason in ("change", "heartbeat")
    beat = await replica.next_announcement(lambda e: e.reason == "heartbeat")
    assert list(beat.loaded_versions) == [version.version_id]

    await replica.service.stop()
    drain = await replica.next_announcement(lambda e: e.reason == "drain")
    assert not drain.serving
    stop = await replica.next_announcement(lambda e: e.reason == "stop")
    assert not stop.serving


async def test_adapter_retired_unloads_the_version(
    start_replica: Callable[..., Any], adapter_dir: Path
) -> None:
    replica: Replica = await start_replica(backend="echo")
    version = replica.registry.add_version(adapter_dir, replica.fingerprint)
    await generate(replica, version.version_id)
    await replica.next_announcement(lambda e: version.version_id in e.loaded_versions)
    js = replica.nc.jetstream()
    retired = events_pb2.AdapterRetired(
        meta=events.new_meta("test", "test"), version_id=version.version_id, reason="rollback"
    )
    await js.publish(events.ADAPTER_RETIRED, retired.SerializeToString())
    await replica.next_announcement(lambda e: version.version_id not in e.loaded_versions)
    listed = await replica.stub.ListAdapters(inference_pb2.ListAdaptersRequest())
    states = {a.version_id: a.state for a in listed.adapters}
    assert states[version.version_id] == inference_pb2.ADAPTER_STATE_UNLOADED


async def test_faults_hit_only_the_named_version(
    start_replica: Callable[..., Any], adapter_dir: Path, tiny_model_dir: Path
) -> None:
    registry = FakeRegistry()
    fingerprint = hashing.model_fingerprint(tiny_model_dir)
    candidate = registry.add_version(adapter_dir, fingerprint)
    stable = registry.add_version(adapter_dir, fingerprint)
    replica: Replica = await start_replica(
        registry, backend="echo", fault_error_rate=1.0, fault_versions=candidate.version_id
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(replica, candidate.version_id)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "injected fault" in (info.value.details() or "")
    ok = await generate(replica, stable.version_id, prompt="one two three")
    assert ok.text == "one two three"
    listed = await replica.stub.ListAdapters(inference_pb2.ListAdaptersRequest())
    by_id = {a.version_id: a for a in listed.adapters}
    assert by_id[candidate.version_id].errors == 1
    assert by_id[stable.version_id].requests == 1
    assert by_id[stable.version_id].completion_tokens == 3


async def test_drain_finishes_in_flight_and_refuses_new_requests(
    start_replica: Callable[..., Any],
) -> None:
    # Slow enough that the stream is still running when the drain starts.
    replica: Replica = await start_replica(backend="echo", fault_delay_factor=50.0)
    request = inference_pb2.GenerateRequest(
        prompt=" ".join(f"w{i}" for i in range(12)), sampling=common_pb2.SamplingParams()
    )
    call = replica.stub.GenerateStream(request, timeout=30)
    first = await call.read()
    assert first.text
    stopping = asyncio.create_task(replica.service.stop())
    await replica.next_announcement(lambda e: e.reason == "drain")
    assert replica.service.core.draining
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(replica, "")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = [chunk async for chunk in call]
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_EOS
    assert "".join([first.text, *(c.text for c in rest)]) == request.prompt
    await asyncio.wait_for(stopping, 30)


async def test_backend_failure_reports_not_serving_until_recovered(
    start_replica: Callable[..., Any],
) -> None:
    replica: Replica = await start_replica()
    await replica.next_announcement(lambda e: e.serving)
    backend: Any = replica.service.backend
    runtime = backend._rt
    original = runtime.forward
    broken = True

    def forward(*args: Any) -> Any:
        if broken:
            raise RuntimeError("device lost")
        return original(*args)

    runtime.forward = forward
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(replica, "")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    down = await replica.next_announcement(lambda e: not e.serving)
    # Announced by the health probe's change (every 0.1 s here) or by a heartbeat that
    # happened to come first; either way within an interval.
    assert down.reason in ("change", "heartbeat")
    for _ in range(100):
        if await replica.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.05)
    assert await replica.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(replica, "")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    broken = False  # the device is back: the next probe pass succeeds
    await replica.next_announcement(lambda e: e.serving)
    reply = await generate(replica, "")
    assert reply.completion_tokens > 0
