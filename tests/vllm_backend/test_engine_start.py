"""vLLM builds its engine in a thread (about a minute for the tiny model on a CPU, minutes
for a large model on a GPU): meanwhile the replica's event loop answers health checks
(NOT_SERVING), sends its heartbeats, and a stop drains at once without waiting for the
engine, which is shut down when its build ends."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ftops_inference.service import InferenceService
from ftops_inference.settings import InferenceSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BUILD_THREAD = "vllm-engine-build"


def _building() -> bool:
    return any(t.name == BUILD_THREAD for t in threading.enumerate())


async def test_health_heartbeats_and_drain_answer_while_vllm_builds_its_engine(
    nats_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = InferenceSettings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        nats_url=nats_url,
        instance_id=f"vllm-start-{uuid.uuid4().hex[:6]}",
        base_model_path=str(tiny_model_dir),
        registry_address="127.0.0.1:1",  # no registry: the replica never serves, as wanted
        adapter_cache_dir=str(tmp_path / "cache"),
        health_interval_s=0.2,
        announce_interval_s=0.3,
        auth_mode="disabled",
        backend="vllm",
        vllm_max_loras=2,
        vllm_max_cpu_loras=2,
        vllm_max_lora_rank=8,
        vllm_dtype="float32",
        vllm_cpu_kvcache_space_gib=1,
    )
    service = InferenceService(settings)
    await service.start()
    stopped = False
    try:
        async with grpc.aio.insecure_channel(service.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while not _building():  # vLLM is imported first (seconds)
                assert not service.backend.ready
                await asyncio.sleep(0.1)
            answers: list[int] = []
            heartbeats_before = service.announcer.published
            # A loop blocked by the build would leave these calls to time out.
            while len(answers) < 5 or service.announcer.published < heartbeats_before + 3:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                answers.append(reply.status)
                assert _building(), "the engine was built before the checks were done"
                await asyncio.sleep(0.2)
            assert set(answers) == {health_pb2.HealthCheckResponse.NOT_SERVING}
            assert not service._announcement().serving

            # Drain and stop: done while the engine is still being built.
            await service.stop()
            stopped = True
            assert _building()
    finally:
        if not stopped:
            await service.stop()
        # The abandoned engine is shut down once built; the next test gets the CPU back.
        while _building():  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    assert not service.backend.ready
