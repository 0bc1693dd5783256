"""The monitor reads the versions' evaluations from a real registry over gRPC: a
candidate whose evaluation refused it is rolled back with the registry's reasons."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js.api import DeliverPolicy

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_monitor.service import MonitorService
from ftops_monitor.settings import MonitorSettings
from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.client import channel
from ftops_runtime.events import RELEASE_ROLLBACK, ROUTE_CHANGED, derived_event_id, new_meta

pytestmark = pytest.mark.integration
BLOBS = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00" * 64}


@pytest.fixture
async def registry(tmp_path: Path, nats_url: str) -> AsyncIterator[RegistryApp]:
    app = RegistryApp(
        RegistrySettings(
            grpc_port=0,
            nats_url=nats_url,
            database_url=f"sqlite:///{tmp_path}/registry.db",
            artifact_dir=tmp_path / "artifacts",
            shutdown_grace_s=0.5,
            instance_id=f"reg-{uuid.uuid4().hex[:6]}",
            auth_mode="disabled",
        ),
        durable=f"registry-mon-{uuid.uuid4().hex[:8]}",
    )
    await app.start()
    await app.wait_ready()
    yield app
    await app.stop()


async def _uploads() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
    files = [
        common_pb2.ArtifactFile(path=p, sha256=hashlib.sha256(d).hexdigest(), size_bytes=len(d))
        for p, d in BLOBS.items()
    ]
    yield registry_pb2.UploadArtifactRequest(header=registry_pb2.UploadHeader(files=files))
    for index, data in enumerate(BLOBS.values()):
        yield registry_pb2.UploadArtifactRequest(
            chunk=registry_pb2.FileChunk(file_index=index, data=data)
        )


async def test_refused_evaluation_rolls_the_release_back(
    registry: RegistryApp, nats_url: str
) -> None:
    adapter = f"eval-bot-{uuid.uuid4().hex[:6]}"
    async with channel(registry.address) as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        await stub.RegisterBaseModel(
            registry_pb2.RegisterBaseModelRequest(
                name="tiny", fingerprint=hashlib.sha256(b"base").hexdigest(), uri="/m"
            )
        )
        artifact = await stub.UploadArtifact(_uploads())
        stable = await stub.RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                adapter=adapter,
                base_model="tiny",
                artifact_id=artifact.artifact_id,
                evaluation=common_pb2.Evaluation(gate_passed=True, metrics={"retention": 0.97}),
            )
        )
        # Registered as rejected: the gateway would never release it; the monitor's
        # release-time check is the second line of defence.
        candidate = await stub.RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                adapter=adapter,
                artifact_id=artifact.artifact_id,
                parent_version_id=stable.version_id,
                rejected=True,
                evaluation=common_pb2.Evaluation(
                    gate_passed=False,
                    reasons=["retention 0.40 < 0.95"],
                    metrics={"retention": 0.4},
                ),
            )
        )

    rollbacks: list[events_pb2.ReleaseRollback] = []
    seen = asyncio.Event()

    release_id = f"rel_{uuid.uuid4().hex[:8]}"

    async def on_rollback(event: events_pb2.ReleaseRollback, delivery: Delivery) -> None:
        if event.release_id == release_id:
            rollbacks.append(event)
            seen.set()

    monitor = MonitorService(
        MonitorSettings(
            grpc_port=0,
            nats_url=nats_url,
            instance_id=f"mon-{uuid.uuid4().hex[:6]}",
            analysis_interval_s=0.1,
            shutdown_grace_s=0.5,
            metrics_port=-1,
            registry_address=registry.address,
            auth_mode="disabled",  # access control has its own tests (test_access_control.py)
        )
    )
    await monitor.start()
    # The gateway's route.changed for the release it started (the monitor follows it).
    meta = new_meta("gateway", "test")
    meta.event_id = derived_event_id("route.changed", adapter, 1)
    started = events_pb2.RouteChanged(
        meta=meta,
        alias=adapter,
        revision=1,
        stable_version_id=stable.version_id,
        release=events_pb2.ReleaseSnapshot(
            release_id=release_id,
            state="running",
            strategy=events_pb2.RELEASE_STRATEGY_CANARY,
            stable_version_id=stable.version_id,
            candidate_version_id=candidate.version_id,
            steps=[10, 100],
            candidate_weight=10,
            analysis=events_pb2.AnalysisSettings(auto=True),
            change=events_pb2.ReleaseChange(kind="started", event_id=uuid.uuid4().hex),
        ),
    )
    started.release.started_at.GetCurrentTime()
    started.release.step_started_at.CopyFrom(started.release.started_at)
    try:
        async with EventBus(nats_url, service="test", instance=uuid.uuid4().hex[:6]) as bus:
            await bus.wait_ready(10)
            bus.subscribe(
                RELEASE_ROLLBACK,
                f"t-{uuid.uuid4().hex[:8]}",
                on_rollback,
                deliver_policy=DeliverPolicy.NEW,
            )
            await monitor.bus.wait_ready(10)
            await asyncio.sleep(0.3)  # consumers bound
            await bus.publish(ROUTE_CHANGED, started)
            await asyncio.wait_for(seen.wait(), 10)
        [rollback] = rollbacks
        assert "retention 0.40 < 0.95" in rollback.reason
        assert rollback.figures["eval_retention"] == pytest.approx(0.4)
        assert rollback.figures["stable_eval_retention"] == pytest.approx(0.97)
    finally:
        await monitor.stop()
