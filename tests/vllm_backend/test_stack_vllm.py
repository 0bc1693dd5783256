"""End to end with the inference service on vLLM: the five services as processes (inference
from the vLLM environment, the others from the main one, as ``ftops-dev up --backend vllm``
runs them), driven through the gateway, the registry and NATS.

Adapters are registered as the trainer would (artifact, version, ``adapter.ready``) but
with random weights written by the test, so ten versions cost seconds, not ten trainings.
The replica keeps at most eight adapters in vLLM's CPU cache (``TINY_MODEL_SETTINGS``), so
the ten evict the first ones, which vLLM then reloads from disk. Sampling is seeded: the
same version, prompt and seed must give the same text whatever happened in between."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.registry.v1 import registry_pb2_grpc
from ftops_devstack.adapters import register_adapter
from ftops_devstack.demo import EventLog
from ftops_devstack.servers import ManagedServer, start_nats, start_redis
from ftops_devstack.stack import Stack
from ftops_devstack.vllm_env import TINY_MODEL_SETTINGS, main_python
from ftops_runtime.bus import EventBus
from ftops_runtime.client import channel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MakeLora = Callable[..., Path]  # tests/vllm_backend/conftest.py: write_lora
ALIAS = "vllm-bot"
PROMPT = "The capital of"
SEEDED = common_pb2.SamplingParams(max_tokens=12, temperature=1.0, seed=7)


@dataclass
class VllmStack:
    stack: Stack
    nats: ManagedServer
    redis: ManagedServer
    events: EventLog
    bus: EventBus
    channels: dict[str, grpc.aio.Channel]
    # version id -> the text it gave for PROMPT with SEEDED, the first time it was asked
    answers: dict[str, str] = field(default_factory=dict)
    versions: list[str] = field(default_factory=list)

    def gateway(self) -> gateway_pb2_grpc.GatewayServiceStub:
        return gateway_pb2_grpc.GatewayServiceStub(self.channels["gateway"])

    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self.channels["registry"])

    def inference(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channels["inference"])


@pytest.fixture(scope="module")
async def vllm_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> AsyncIterator[VllmStack]:
    nats_server, redis_server = start_nats(), start_redis()
    stack = Stack(
        tmp_path_factory.mktemp("vllm-stack"),
        nats_server.url,
        redis_server.url,
        tiny_model_dir,
        extra_env={"FTOPS_SHUTDOWN_GRACE_S": "2"},
        # The tests run in the vLLM environment: inference from it, the rest from .venv.
        python=str(main_python()),
        interpreters={"inference": sys.executable},
        service_env={"inference": {**TINY_MODEL_SETTINGS, "FTOPS_DRAIN_TIMEOUT_S": "60"}},
    )
    log: list[str] = []
    event_log = EventLog(log.append)
    bus = EventBus(nats_server.url, service="trainer", instance="vllm-e2e")
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        stack.start()
        await stack.wait_serving(timeout=600)
        await event_log.start(nats_server.url)
        await bus.start()
        await bus.wait_ready(30)
        channels = {n: channel(stack.address(n)) for n in ("gateway", "registry", "inference")}
        yield VllmStack(stack, nats_server, redis_server, event_log, bus, channels)
    finally:
        for ch in channels.values():
            await ch.close()
        await bus.close()
        await event_log.close()
        stack.stop()
        redis_server.stop()
        nats_server.stop()
        print("\n".join(log))


async def release_version(vs: VllmStack, adapter_dir: Path) -> str:
    """Registered and announced as the trainer does; returns once the replica loaded it."""
    version = await register_adapter(
        vs.registry(), vs.bus, adapter_dir, adapter=ALIAS, base_model="tiny-llama"
    )
    await vs.events.wait_loaded(version.version_id, timeout=120)
    vs.versions.append(version.version_id)
    return version.version_id


async def ask(
    vs: VllmStack, model: str, sampling: common_pb2.SamplingParams = SEEDED
) -> gateway_pb2.GenerateResponse:
    resp: gateway_pb2.GenerateResponse = await vs.gateway().Generate(
        gateway_pb2.GenerateRequest(model=model, prompt=PROMPT, sampling=sampling), timeout=120
    )
    return resp


async def ask_once_served(vs: VllmStack, model: str) -> gateway_pb2.GenerateResponse:
    """Like ``ask``, retried while the gateway has not yet heard of a replica that just
    started (UNAVAILABLE until its first announcement arrives)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await ask(vs, model)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


async def _wait_route(vs: VllmStack, ok: Callable[[gateway_pb2.Route], bool]) -> None:
    gateway = vs.gateway()
    deadline = time.monotonic() + 30
    route = await gateway.GetRoute(gateway_pb2.GetRouteRequest(alias=ALIAS))
    while not ok(route):
        assert time.monotonic() < deadline, f"route did not change: {route}"
        await asyncio.sleep(0.1)
        route = await gateway.GetRoute(gateway_pb2.GetRouteRequest(alias=ALIAS))


async def test_hot_load_canary_promote_rollback_on_vllm(
    vllm_stack: VllmStack, tiny_model_dir: Path, tmp_path: Path, make_lora: MakeLora
) -> None:
    vs = vllm_stack
    listing = await vs.inference().ListAdapters(inference_pb2.ListAdaptersRequest())
    assert listing.backend == "vllm"

    v1 = await release_version(vs, make_lora(tiny_model_dir, tmp_path / "v1", seed=1))
    v2 = await release_version(vs, make_lora(tiny_model_dir, tmp_path / "v2", seed=2))
    for version in (v1, v2):
        vs.answers[version] = (await ask(vs, version)).text
        assert (await ask(vs, version)).text == vs.answers[version]  # seeded: reproducible
    assert vs.answers[v1] != vs.answers[v2]

    gateway = vs.gateway()
    await gateway.SetRoute(gateway_pb2.SetRouteRequest(alias=ALIAS, version_id=v1))
    await gateway.StartRelease(
        gateway_pb2.StartReleaseRequest(
            alias=ALIAS,
            candidate_version_id=v2,
            steps=[50, 100],
            analysis=events_pb2.AnalysisSettings(
                min_requests=5, max_error_rate=0.2, max_latency_ratio=0, auto=False
            ),
        )
    )
    arms: dict[str, set[str]] = {}
    for _ in range(24):
        resp = await ask(vs, ALIAS)
        arms.setdefault(resp.arm, set()).add(resp.text)
        # Each arm answers with its own version's weights, never the other's.
        assert resp.text == vs.answers[resp.version_id]
    assert set(arms) == {"stable", "candidate"}

    await gateway.PromoteRelease(gateway_pb2.ReleaseCommandRequest(alias=ALIAS, reason="e2e"))
    await _wait_route(vs, lambda r: r.stable_version_id == v2 and not r.candidate_version_id)
    assert (await ask(vs, ALIAS)).text == vs.answers[v2]

    await gateway.RollbackRelease(
        gateway_pb2.ReleaseCommandRequest(alias=ALIAS, reason="e2e", revert_promotion=True)
    )
    await _wait_route(vs, lambda r: r.stable_version_id == v1)
    resp = await ask(vs, ALIAS)
    assert (resp.version_id, resp.text) == (v1, vs.answers[v1])


async def test_eight_adapters_at_once_answer_as_each_alone(
    vllm_stack: VllmStack, tiny_model_dir: Path, tmp_path: Path, make_lora: MakeLora
) -> None:
    vs = vllm_stack
    batch = [
        await release_version(vs, make_lora(tiny_model_dir, tmp_path / f"b{i}", seed=100 + i))
        for i in range(8)
    ]
    greedy = common_pb2.SamplingParams(max_tokens=12, temperature=0)
    alone = {v: (await ask(vs, v, greedy)).text for v in batch}
    assert len(set(alone.values())) >= 6  # the adapters really differ
    together = await asyncio.gather(*(ask(vs, v, greedy) for v in batch))
    assert {r.version_id: r.text for r in together} == alone
    for version in batch:
        vs.answers[version] = (await ask(vs, version)).text


async def test_versions_evicted_from_vllms_cpu_cache_reload_with_their_weights(
    vllm_stack: VllmStack,
) -> None:
    vs = vllm_stack
    # Ten versions went through a cache of eight: the first two were evicted (LRU) and
    # vLLM reloads them from the verified files, under the same LoRA ids.
    assert len(vs.versions) == 10
    for version in vs.versions[:2]:
        assert (await ask(vs, version)).text == vs.answers[version]


async def test_unloaded_version_is_gone_and_comes_back_with_its_own_weights(
    vllm_stack: VllmStack,
) -> None:
    vs = vllm_stack
    inference = vs.inference()
    version = vs.versions[2]
    await inference.UnloadAdapter(inference_pb2.UnloadAdapterRequest(version_id=version))
    listing = await inference.ListAdapters(inference_pb2.ListAdaptersRequest())
    assert version not in {a.version_id for a in listing.adapters if a.tier}
    # Asked again, it is loaded on demand under a new LoRA id and answers as before.
    assert (await ask(vs, version)).text == vs.answers[version]


async def test_sigterm_drains_then_a_fresh_engine_gives_the_same_answers(
    vllm_stack: VllmStack,
) -> None:
    vs = vllm_stack
    gateway = vs.gateway()
    stream = gateway.GenerateStream(
        gateway_pb2.GenerateRequest(
            model=vs.versions[1],
            prompt=PROMPT,
            sampling=common_pb2.SamplingParams(max_tokens=200, temperature=1.0, seed=3),
        ),
        timeout=120,
    )
    first = await stream.read()
    assert isinstance(first, gateway_pb2.GenerateChunk)
    chunks = [first]
    # SIGTERM while the stream is in flight: the replica drains it before exiting.
    stopping = asyncio.create_task(asyncio.to_thread(vs.stack.terminate, "inference", 90))
    while isinstance(chunk := await stream.read(), gateway_pb2.GenerateChunk):
        chunks.append(chunk)
    assert await stopping == 0
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert sum(len(c.text) for c in chunks) > 0

    # A fresh engine: every version answers as it did on the old one.
    vs.stack._spawn("inference")
    await vs.stack.wait_serving(timeout=600, only=["inference"])
    assert (await ask_once_served(vs, vs.versions[0])).text == vs.answers[vs.versions[0]]
    for version in vs.versions[1:]:
        assert (await ask(vs, version)).text == vs.answers[version], version
