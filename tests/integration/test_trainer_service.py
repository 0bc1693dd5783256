"""Trainer gRPC service end to end: a fake in-process registry (the real contract over a
real grpc.aio server), real NATS, and real LoRA training on the tiny model."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import ftops_tinymodel
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_runtime import client, events, hashing
from ftops_runtime.bus import Delivery, EventBus
from ftops_trainer.app import TrainerApp
from ftops_trainer.settings import TrainerSettings

pytestmark = pytest.mark.integration

BASE = "tiny-base"
JobState = events_pb2.JobState
FAST = trainer_pb2.Hyperparameters(num_epochs=4, batch_size=4)


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """Just enough of the registry contract for the trainer: base models, artifacts
    (verified like the real one), versions."""

    def __init__(self) -> None:
        self.base_models: dict[str, registry_pb2.BaseModel] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes
        self.artifacts: dict[str, registry_pb2.Artifact] = {}
        self.versions: dict[str, registry_pb2.Version] = {}
        self.by_key: dict[str, str] = {}
        self.downloads: list[str] = []

    async def GetBaseModel(
        self, request: registry_pb2.GetBaseModelRequest, context: Any
    ) -> registry_pb2.BaseModel:
        if request.name not in self.base_models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"base model {request.name} unknown")
        return self.base_models[request.name]

    async def UploadArtifact(
        self, request_iterator: AsyncIterator[registry_pb2.UploadArtifactRequest], context: Any
    ) -> registry_pb2.Artifact:
        header: registry_pb2.UploadHeader | None = None
        data: list[bytearray] = []
        async for part in request_iterator:
            if part.HasField("header"):
                header = part.header
                data = [bytearray() for _ in header.files]
            else:
                data[part.chunk.file_index] += part.chunk.data
        assert header is not None
        for f, blob in zip(header.files, data, strict=True):
            if hashlib.sha256(blob).hexdigest() != f.sha256 or len(blob) != f.size_bytes:
                await context.abort(grpc.StatusCode.DATA_LOSS, f"{f.path} does not match")
            self.blobs[f.sha256] = bytes(blob)
        files = list(header.files)
        artifact = registry_pb2.Artifact(
            artifact_id=hashing.manifest_id((f.path, f.sha256, f.size_bytes) for f in files),
            files=files,
            total_bytes=sum(f.size_bytes for f in files),
        )
        self.artifacts[artifact.artifact_id] = artifact
        return artifact

    async def DownloadArtifact(
        self, request: registry_pb2.DownloadArtifactRequest, context: Any
    ) -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
        self.downloads.append(request.artifact_id)
        artifact = self.artifacts[request.artifact_id]
        yield registry_pb2.DownloadArtifactResponse(manifest=artifact)
        for i, f in enumerate(artifact.files):
            yield registry_pb2.DownloadArtifactResponse(
                chunk=registry_pb2.FileChunk(file_index=i, data=self.blobs[f.sha256])
            )

    async def RegisterVersion(
        self, request: registry_pb2.RegisterVersionRequest, context: Any
    ) -> registry_pb2.Version:
        if request.idempotency_key in self.by_key:
            return self.versions[self.by_key[request.idempotency_key]]
        if request.artifact_id not in self.artifacts:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "artifact not uploaded")
        number = 1 + sum(v.adapter == request.adapter for v in self.versions.values())
        base = self.base_models[request.base_model]
        version = registry_pb2.Version(
            version_id=f"ver_{uuid.uuid4().hex[:12]}",
            adapter=request.adapter,
            number=number,
            team=request.team,
            base_model=request.base_model,
            base_model_fingerprint=base.fingerprint,
            parent_version_id=request.parent_version_id,
            artifact_id=request.artifact_id,
            files=self.artifacts[request.artifact_id].files,
            job_id=request.job_id,
            dataset_fingerprint=request.dataset_fingerprint,
            method=request.method,
            metrics=request.metrics,
            labels=request.labels,
        )
        self.versions[version.version_id] = version
        self.by_key[request.idempotency_key] = version.version_id
        return version

    async def GetVersion(
        self, request: registry_pb2.GetVersionRequest, context: Any
    ) -> registry_pb2.Version:
        if request.version_id not in self.versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.version_id} unknown")
        return self.versions[request.version_id]


@pytest.fixture
async def registry(tiny_model_dir: Path) -> AsyncIterator[tuple[FakeRegistry, str]]:
    fake = FakeRegistry()  # type: ignore[abstract]
    fake.base_models[BASE] = registry_pb2.BaseModel(
        name=BASE, fingerprint=hashing.model_fingerprint(tiny_model_dir), uri=str(tiny_model_dir)
    )
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(fake, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(grace=None)


@pytest.fixture
async def trainer(
    registry: tuple[FakeRegistry, str], nats_url: str, tmp_path: Path
) -> AsyncIterator[tuple[trainer_pb2_grpc.TrainerServiceAsyncStub, TrainerApp]]:
    settings = TrainerSettings(
        registry_address=registry[1],
        nats_url=nats_url,
        work_dir=tmp_path / "work",
        grpc_port=0,
        progress_interval_s=0.2,
    )
    app = TrainerApp(settings)
    await app.start()
    await app.bus.wait_ready(10)
    channel = client.channel(app.address)
    yield trainer_pb2_grpc.TrainerServiceStub(channel), app  # type: ignore[misc]
    await channel.close()
    await app.stop()


@pytest.fixture
async def adapter_ready(nats_url: str) -> AsyncIterator[dict[str, events_pb2.AdapterReady]]:
    """adapter.ready events by job id, from a test-private durable consumer."""
    received: dict[str, events_pb2.AdapterReady] = {}
    bus = EventBus(nats_url, service="test", instance=uuid.uuid4().hex[:6])

    async def handle(event: events_pb2.AdapterReady, delivery: Delivery) -> None:
        received[event.job_id] = event

    bus.subscribe(events.ADAPTER_READY, f"test-trainer-{uuid.uuid4().hex[:8]}", handle)
    await bus.start()
    await bus.wait_ready(10)
    yield received
    await bus.close()


def facts_jsonl(n: int) -> bytes:
    return "\n".join(json.dumps(f) for f in ftops_tinymodel.new_facts()[:n]).encode()


async def watch_until_done(stub: Any, job_id: str) -> list[trainer_pb2.Job]:
    seen = []
    async for job in stub.WatchJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=60):
        seen.append(job)
    return seen


async def test_job_trains_registers_and_announces(
    trainer: tuple[Any, TrainerApp],
    registry: tuple[FakeRegistry, str],
    adapter_ready: dict[str, events_pb2.AdapterReady],
) -> None:
    stub, app = trainer
    fake, _ = registry
    spec = trainer_pb2.JobSpec(
        adapter="support-bot",
        team="support",
        base_model=BASE,
        dataset_jsonl=facts_jsonl(8),
        hyperparameters=FAST,
        labels={"ticket": "T-1"},
    )
    job = await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec, idempotency_key="k1"))
    assert job.state == JobState.JOB_STATE_QUEUED
    assert job.spec.lora.r == 8
    assert job.spec.method == "lora"
    again = await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec, idempotency_key="k1"))
    assert again.job_id == job.job_id

    seen = await watch_until_done(stub, job.job_id)
    final = seen[-1]
    assert final.state == JobState.JOB_STATE_SUCCEEDED, final.error
    states = [j.state for j in seen]
    assert JobState.JOB_STATE_RUNNING in states
    assert final.step == final.total_steps == 8
    assert final.loss > 0
    assert (final.records_total, final.records_used, final.records_skipped) == (8, 8, 0)

    version = fake.versions[final.version_id]
    assert final.version_number == version.number == 1
    assert version.job_id == job.job_id
    assert version.adapter == "support-bot"
    assert version.dataset_fingerprint == hashlib.sha256(spec.dataset_jsonl).hexdigest()
    assert set(version.metrics) >= {"final_loss", "train_records", "train_seconds"}
    assert dict(version.labels) == {"ticket": "T-1"}
    assert sorted(f.path for f in version.files) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # What the registry received hashes to what was declared (checked on upload too).
    for f in version.files:
        assert hashlib.sha256(fake.blobs[f.sha256]).hexdigest() == f.sha256

    for _ in range(100):
        if job.job_id in adapter_ready:
            break
        await asyncio.sleep(0.1)
    event = adapter_ready[job.job_id]
    assert event.version_id == version.version_id
    assert event.version_number == 1
    assert event.base_model == BASE
    assert event.base_model_fingerprint == fake.base_models[BASE].fingerprint
    assert event.meta.producer_service == "trainer"
    assert event.meta.event_id
    assert {(f.path, f.sha256, f.size_bytes) for f in event.files} == {
        (f.path, f.sha256, f.size_bytes) for f in version.files
    }

    listed = await stub.ListJobs(trainer_pb2.ListJobsRequest(adapter="support-bot"))
    assert [j.job_id for j in listed.jobs] == [job.job_id]
    assert await app.server.probe()  # NATS and registry both reachable

    # Continue training from the version just made: the parent artifact is downloaded.
    child_spec = trainer_pb2.JobSpec(
        adapter="support-bot",
        base_model=BASE,
        parent_version_id=version.version_id,
        dataset_jsonl=facts_jsonl(8),
        hyperparameters=trainer_pb2.Hyperparameters(num_epochs=1, batch_size=4),
    )
    child = await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=child_spec))
    child_final = (await watch_until_done(stub, child.job_id))[-1]
    assert child_final.state == JobState.JOB_STATE_SUCCEEDED, child_final.error
    assert child_final.version_number == 2
    assert fake.downloads == [version.artifact_id]
    assert fake.versions[child_final.version_id].parent_version_id == version.version_id


async def test_unparsable_dataset_fails_naming_the_line(trainer: tuple[Any, TrainerApp]) -> None:
    stub, _ = trainer
    bad = b'{"text": "fine"}\n{"prompt": "p", "completion": "c"}\n{not json at all\n'
    job = await stub.SubmitJob(
        trainer_pb2.SubmitJobRequest(
            spec=trainer_pb2.JobSpec(adapter="bad-data", base_model=BASE, dataset_jsonl=bad)
        )
    )
    final = (await watch_until_done(stub, job.job_id))[-1]
    assert final.state == JobState.JOB_STATE_FAILED
    assert "line 3: invalid JSON" in final.error
    assert "1 bad lines out of 3" in final.error


async def test_fingerprint_mismatch_and_unknown_base_fail_clearly(
    trainer: tuple[Any, TrainerApp], registry: tuple[FakeRegistry, str]
) -> None:
    stub, _ = trainer
    fake, _ = registry
    real = fake.base_models[BASE]
    fake.base_models["moved"] = registry_pb2.BaseModel(
        name="moved", fingerprint="0" * 64, uri=real.uri
    )
    for base, expected in [("moved", "fingerprint"), ("nope", "not registered")]:
        job = await stub.SubmitJob(
            trainer_pb2.SubmitJobRequest(
                spec=trainer_pb2.JobSpec(adapter="a", base_model=base, dataset_jsonl=facts_jsonl(2))
            )
        )
        final = (await watch_until_done(stub, job.job_id))[-1]
        assert final.state == JobState.JOB_STATE_FAILED
        assert expected in final.error
        assert repr(base) in final.error


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (trainer_pb2.JobSpec(adapter="Bad Name", base_model=BASE, dataset_jsonl=b"{}"), "adapter"),
        (trainer_pb2.JobSpec(adapter="ok", dataset_jsonl=b"{}"), "base_model"),
        (trainer_pb2.JobSpec(adapter="ok", base_model=BASE), "dataset"),
    ],
)
async def test_invalid_specs_are_rejected(
    trainer: tuple[Any, TrainerApp], spec: trainer_pb2.JobSpec, message: str
) -> None:
    stub, _ = trainer
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetJob(trainer_pb2.GetJobRequest(job_id="job_missing"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
