"""The registry service over a real socket with real NATS (and Postgres where there is
one): artifacts, versions (rejected ones too), job records, error codes, health,
reflection, release events, concurrency and schema upgrades."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
import nats
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nats.aio.msg import Msg

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2
from ftops_registry.app import RegistryApp
from ftops_registry.artifacts import LocalArtifactStore
from ftops_registry.settings import RegistrySettings
from ftops_runtime import events
from ftops_runtime.auth import new_api_key
from ftops_runtime.client import channel

pytestmark = pytest.mark.integration
SERVICE = "ftops.registry.v1.RegistryService"
FP = hashlib.sha256(b"tiny base model").hexdigest()
MIB = 1024 * 1024


def _settings(tmp_path: Path, nats_url: str, database_url: str) -> RegistrySettings:
    return RegistrySettings(
        grpc_port=0,
        nats_url=nats_url,
        database_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        health_interval_s=0.1,
        shutdown_grace_s=1,
        instance_id=f"test-{uuid.uuid4().hex[:6]}",
        # These tests are about the registry's data; test_registry_auth covers access.
        auth_mode="disabled",
    )


async def _start(settings: RegistrySettings) -> RegistryApp:
    app = RegistryApp(settings, durable=f"registry-test-{uuid.uuid4().hex[:8]}")
    await app.start()
    return app


def _stub(ch: grpc.aio.Channel) -> registry_pb2_grpc.RegistryServiceAsyncStub:
    # An aio channel makes the async stub (the .pyi overload cannot see it: grpc is untyped).
    return cast(
        "registry_pb2_grpc.RegistryServiceAsyncStub", registry_pb2_grpc.RegistryServiceStub(ch)
    )


@pytest.fixture
async def app(tmp_path: Path, nats_url: str) -> AsyncIterator[RegistryApp]:
    registry = await _start(_settings(tmp_path, nats_url, f"sqlite:///{tmp_path}/registry.db"))
    await registry.wait_ready()
    yield registry
    await registry.stop()


@pytest.fixture
async def stub(app: RegistryApp) -> AsyncIterator[registry_pb2_grpc.RegistryServiceAsyncStub]:
    async with channel(app.address) as ch:
        yield _stub(ch)


def _files(blobs: dict[str, bytes]) -> list[common_pb2.ArtifactFile]:
    return [
        common_pb2.ArtifactFile(path=p, sha256=hashlib.sha256(d).hexdigest(), size_bytes=len(d))
        for p, d in blobs.items()
    ]


async def _upload_requests(
    files: list[common_pb2.ArtifactFile], blobs: list[bytes]
) -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
    yield registry_pb2.UploadArtifactRequest(header=registry_pb2.UploadHeader(files=files))
    for index, data in enumerate(blobs):
        for start in range(0, len(data), MIB):
            yield registry_pb2.UploadArtifactRequest(
                chunk=registry_pb2.FileChunk(file_index=index, data=data[start : start + MIB])
            )


async def _upload(
    stub: registry_pb2_grpc.RegistryServiceAsyncStub, blobs: dict[str, bytes]
) -> registry_pb2.Artifact:
    artifact: registry_pb2.Artifact = await stub.UploadArtifact(
        _upload_requests(_files(blobs), list(blobs.values()))
    )
    return artifact


ADAPTER_BLOBS = {
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
    "adapter_model.safetensors": bytes(range(256)) * (3 * MIB // 256 + 7),  # 3 chunks+
}


async def _base_and_artifact(
    stub: registry_pb2_grpc.RegistryServiceAsyncStub,
) -> registry_pb2.Artifact:
    await stub.RegisterBaseModel(
        registry_pb2.RegisterBaseModelRequest(name="tiny", fingerprint=FP, uri="/models/tiny")
    )
    return await _upload(stub, ADAPTER_BLOBS)


def _blob_files(app: RegistryApp) -> list[Path]:
    return [p for p in (app.settings.artifact_dir / "sha256").rglob("*") if p.is_file()]


async def test_upload_download_roundtrip(
    app: RegistryApp, stub: registry_pb2_grpc.RegistryServiceAsyncStub
) -> None:
    artifact = await _upload(stub, ADAPTER_BLOBS)
    expected_id = hashlib.sha256(
        "\n".join(sorted(f"{f.path}\t{f.sha256}\t{f.size_bytes}" for f in artifact.files)).encode()
    ).hexdigest()
    assert artifact.artifact_id == expected_id
    assert artifact.total_bytes == sum(len(b) for b in ADAPTER_BLOBS.values())
    assert (await _upload(stub, ADAPTER_BLOBS)).artifact_id == artifact.artifact_id

    received: dict[int, bytearray] = {}
    manifest = None
    async for msg in stub.DownloadArtifact(
        registry_pb2.DownloadArtifactRequest(artifact_id=artifact.artifact_id)
    ):
        if msg.WhichOneof("part") == "manifest":
            manifest = msg.manifest
        else:
            received.setdefault(msg.chunk.file_index, bytearray()).extend(msg.chunk.data)
    assert manifest is not None
    assert {manifest.files[i].path: bytes(d) for i, d in received.items()} == ADAPTER_BLOBS

    # A blob that rots on disk is reported, never served silently.
    weights = next(f for f in artifact.files if f.path.endswith(".safetensors"))
    assert isinstance(app.store, LocalArtifactStore)
    blob = app.store.blob_path(weights.sha256)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.DownloadArtifact(
            registry_pb2.DownloadArtifactRequest(artifact_id=artifact.artifact_id)
        ):
            pass
    assert err.value.code() == grpc.StatusCode.DATA_LOSS


async def test_bad_uploads_are_refused_and_nothing_stored(
    app: RegistryApp, stub: registry_pb2_grpc.RegistryServiceAsyncStub
) -> None:
    files = _files(ADAPTER_BLOBS)
    files[1].sha256 = "0" * 64
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UploadArtifact(_upload_requests(files, list(ADAPTER_BLOBS.values())))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "adapter_model.safetensors" in (err.value.details() or "")

    pickle = {"pytorch_model.bin": b"not really a pickle"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _upload(stub, pickle)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "safetensors only" in (err.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _upload(stub, {"../escape.json": b"{}"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    for near_miss in ("x.pkl2", "adapter_model.bin."):  # let in by a suffix rule once
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _upload(stub, {near_miss: b"\x80\x04"})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert repr(near_miss) in (err.value.details() or "")
    assert _blob_files(app) == []


async def test_register_get_lineage_alias_and_not_found(
    stub: registry_pb2_grpc.RegistryServiceAsyncStub,
) -> None:
    artifact = await _base_and_artifact(stub)
    v1 = await stub.RegisterVersion(
        registry_pb2.RegisterVersionRequest(
            adapter="support-bot",
            team="support",
            base_model="tiny",
            artifact_id=artifact.artifact_id,
            job_id="job-1",
            idempotency_key="job-1",
        )
    )
    v2 = await stub.RegisterVersion(
        registry_pb2.RegisterVersionRequest(
            adapter="support-bot",
            base_model="tiny",
            artifact_id=artifact.artifact_id,
            parent_version_id=v1.version_id,
        )
    )
    assert (v1.number, v2.number) == (1, 2)
    assert len(v2.files) == 2
    assert (await stub.GetVersion(registry_pb2.GetVersionRequest(name="support-bot:2"))) == v2
    lineage = await stub.GetLineage(registry_pb2.GetLineageRequest(version_id=v2.version_id))
    assert [v.number for v in lineage.chain] == [2, 1]
    assert lineage.base_model.fingerprint == FP
    alias = await stub.SetAlias(
        registry_pb2.SetAliasRequest(adapter="support-bot", name="prod", version_id=v2.version_id)
    )
    assert alias.version_id == v2.version_id
    listed = await stub.ListVersions(registry_pb2.ListVersionsRequest(adapter="support-bot"))
    assert [v.number for v in listed.versions] == [1, 2]

    async def code_of(call: object) -> grpc.StatusCode:
        try:
            await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    nf = grpc.StatusCode.NOT_FOUND
    assert (
        await code_of(stub.GetVersion(registry_pb2.GetVersionRequest(version_id="ver_00000000")))
        == nf
    )
    assert await code_of(stub.GetBaseModel(registry_pb2.GetBaseModelRequest(name="ghost"))) == nf
    assert await code_of(stub.GetRelease(registry_pb2.GetReleaseRequest(release_id="ghost"))) == nf
    assert (
        await code_of(stub.GetAlias(registry_pb2.GetAliasRequest(adapter="support-bot", name="x")))
        == nf
    )
    assert (
        await code_of(
            stub.DownloadArtifact(
                registry_pb2.DownloadArtifactRequest(artifact_id="ab" * 32)
            ).read()
        )
        == nf
    )
    assert (
        await code_of(
            stub.RegisterVersion(
                registry_pb2.RegisterVersionRequest(
                    adapter="new-bot", base_model="ghost", artifact_id=artifact.artifact_id
                )
            )
        )
        == nf
    )
    assert (
        await code_of(
            stub.RegisterVersion(
                registry_pb2.RegisterVersionRequest(adapter="support-bot", artifact_id="ab" * 32)
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        await code_of(stub.RegisterVersion(registry_pb2.RegisterVersionRequest(adapter="bad name")))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(
            stub.RegisterBaseModel(
                registry_pb2.RegisterBaseModelRequest(name="tiny", fingerprint="1" * 64, uri="/x")
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )


async def test_health_and_reflection(app: RegistryApp) -> None:
    async with channel(app.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert SERVICE in names


async def test_release_events_are_recorded_once(
    app: RegistryApp, stub: registry_pb2_grpc.RegistryServiceAsyncStub, nats_url: str
) -> None:
    release_id = f"rel-{uuid.uuid4().hex[:8]}"
    alias = f"support-bot-{uuid.uuid4().hex[:6]}"
    # The gateway's route.changed after each change it applied: start, pause, resume and
    # the final promotion, one revision each (their changes a second apart).
    changes: list[tuple[str, str, dict[str, Any]]] = [
        ("started", "running", {"candidate_weight": 10}),
        ("paused", "paused", {"candidate_weight": 10}),
        ("resumed", "running", {"candidate_weight": 10}),
        ("promote", "promoted", {"step_index": 1, "candidate_weight": 0}),
    ]
    routes: list[events_pb2.RouteChanged] = []
    for revision, (kind, state, fields) in enumerate(changes, start=1):
        change = events_pb2.ReleaseChange(
            kind=kind, event_id=uuid.uuid4().hex, reason=f"{kind} reason", final=kind == "promote"
        )
        change.occurred_at.FromSeconds(1_700_000_000 + revision)
        snapshot = events_pb2.ReleaseSnapshot(
            release_id=release_id,
            state=state,
            strategy=events_pb2.RELEASE_STRATEGY_CANARY,
            stable_version_id="ver_a",
            candidate_version_id="ver_b",
            steps=[10, 100],
            change=change,
            **fields,
        )
        snapshot.started_at.FromSeconds(1_700_000_001)
        routes.append(
            events_pb2.RouteChanged(
                meta=events.new_meta("gateway", "test"),
                alias=alias,
                revision=revision,
                release=snapshot,
            )
        )
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        # Raw publishes without Nats-Msg-Id: JetStream stores both copies, so the
        # registry's own idempotency (unique event id) is what keeps one entry each. The
        # promotion comes first: the release is created from it, the older changes fill in
        # the history without moving its state back.
        for event in [routes[-1], *routes[:-1]]:
            for _ in range(2):
                await js.publish(events.ROUTE_CHANGED, event.SerializeToString())
    finally:
        await nc.close()

    deadline = time.monotonic() + 15
    release = None
    while time.monotonic() < deadline:
        try:
            release = await stub.GetRelease(registry_pb2.GetReleaseRequest(release_id=release_id))
            if len(release.history) >= len(routes) and release.strategy:
                break
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # let any duplicate land if it were going to
    release = await stub.GetRelease(registry_pb2.GetReleaseRequest(release_id=release_id))
    assert [d.kind for d in release.history] == ["started", "paused", "resumed", "promote"]
    assert [d.reason for d in release.history][-1] == "promote reason"
    assert release.history[-1].final
    assert release.state == "promoted"
    assert release.current_weight == 100
    assert release.strategy == "canary"
    assert (release.stable_version_id, release.candidate_version_id) == ("ver_a", "ver_b")
    listed = await stub.ListReleases(registry_pb2.ListReleasesRequest(alias=alias))
    assert release_id in [r.release_id for r in listed.releases]
    # Recorded changes are audited once each, by the producer of the event.
    audit = await stub.ListAudit(
        registry_pb2.ListAuditRequest(resource_prefix=f"release:{release_id}")
    )
    assert sorted(e.method for e in audit.entries) == [
        "release.paused",
        "release.promote",
        "release.resumed",
        "release.started",
    ]
    assert {e.actor for e in audit.entries} == {"gateway/test"}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/registry.db"
    else:
        yield request.getfixturevalue("postgres_url")


async def test_concurrent_registrations_get_distinct_consecutive_numbers(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    app = await _start(_settings(tmp_path, nats_url, database_url))
    try:
        await app.wait_ready()
        async with channel(app.address) as ch:
            stub = _stub(ch)
            artifact = await _base_and_artifact(stub)
            request = registry_pb2.RegisterVersionRequest(
                adapter="busy-bot", base_model="tiny", artifact_id=artifact.artifact_id
            )
            versions = await asyncio.gather(*(stub.RegisterVersion(request) for _ in range(20)))
            assert sorted(v.number for v in versions) == list(range(1, 21))
            assert len({v.version_id for v in versions}) == 20
    finally:
        await app.stop()


async def test_unreachable_database_is_not_serving_then_recovers(
    tmp_path: Path, nats_url: str, postgres_admin_url: str
) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"ftops_late_{uuid.uuid4().hex[:8]}"
    url = make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    app = await _start(_settings(tmp_path, nats_url, url))
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with channel(app.address) as ch:
            stub = _stub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            await asyncio.sleep(0.5)
            status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetBaseModel(registry_pb2.GetBaseModelRequest(name="tiny"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            with admin.connect() as conn:  # the database appears: the registry recovers
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            await app.wait_ready(timeout=30)
            await _base_and_artifact(stub)
    finally:
        await app.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


async def _code_and_details(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_rejected_version_round_trip_and_refusals(
    app: RegistryApp, stub: registry_pb2_grpc.RegistryServiceAsyncStub, nats_url: str
) -> None:
    artifact = await _base_and_artifact(stub)
    replay = await _upload(stub, {"replay_buffer.jsonl": b'{"text": "kept"}\n'})
    good = await stub.RegisterVersion(
        registry_pb2.RegisterVersionRequest(
            adapter="gate-bot", base_model="tiny", artifact_id=artifact.artifact_id
        )
    )
    request = registry_pb2.RegisterVersionRequest(
        adapter="gate-bot",
        artifact_id=artifact.artifact_id,
        parent_version_id=good.version_id,
        idempotency_key="job-gate-final",
        rejected=True,
        evaluation=common_pb2.Evaluation(
            gate_passed=False, reasons=["retention 0.70 < 0.95"], metrics={"retention": 0.7}
        ),
        replay_artifact_id=replay.artifact_id,
        dataset_artifact_id=replay.artifact_id,
    )
    bad = await stub.RegisterVersion(request)
    assert (good.state, bad.state) == ("ready", "rejected")
    assert bad.evaluation.reasons == ["retention 0.70 < 0.95"]
    assert dict(bad.evaluation.metrics) == {"retention": 0.7}
    assert bad.replay_artifact_id == bad.dataset_artifact_id == replay.artifact_id
    assert await stub.RegisterVersion(request) == bad  # a retry: same version
    assert await stub.GetVersion(registry_pb2.GetVersionRequest(version_id=bad.version_id)) == bad
    listed = await stub.ListVersions(registry_pb2.ListVersionsRequest(adapter="gate-bot"))
    assert [(v.number, v.state) for v in listed.versions] == [(1, "ready"), (2, "rejected")]

    code, details = await _code_and_details(
        stub.SetAlias(
            registry_pb2.SetAliasRequest(adapter="gate-bot", name="prod", version_id="gate-bot:2")
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "rejected" in details
    assert "retention 0.70" in details
    missing = registry_pb2.RegisterVersionRequest()
    missing.CopyFrom(request)
    missing.idempotency_key = ""
    missing.replay_artifact_id = "ab" * 32
    code, details = await _code_and_details(stub.RegisterVersion(missing))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "replay_artifact_id" in details

    # A route.changed whose release started on it (puts it on traffic) is dead-lettered
    # at once, not recorded.
    release_id = f"rel-{uuid.uuid4().hex[:8]}"
    started = events_pb2.RouteChanged(
        meta=events.new_meta("gateway", "test"),
        alias="gate-bot",
        revision=1,
        stable_version_id=good.version_id,
        release=events_pb2.ReleaseSnapshot(
            release_id=release_id,
            state="running",
            stable_version_id=good.version_id,
            candidate_version_id=bad.version_id,
            steps=[10, 100],
            candidate_weight=10,
            change=events_pb2.ReleaseChange(kind="started", event_id=uuid.uuid4().hex),
        ),
    )
    nc = await nats.connect(nats_url)
    try:
        dead: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_dead(msg: Msg) -> None:
            if events_pb2.RouteChanged.FromString(msg.data).release.release_id == release_id:
                await dead.put(msg)

        await nc.subscribe(f"deadletter.{events.ROUTE_CHANGED}", cb=on_dead)
        await nc.jetstream().publish(events.ROUTE_CHANGED, started.SerializeToString())
        msg = await asyncio.wait_for(dead.get(), 15)
    finally:
        await nc.close()
    assert msg.headers is not None
    assert "rejected" in msg.headers["Ftops-Reason"]
    assert msg.headers["Ftops-Deliveries"] == "1"
    code, _ = await _code_and_details(
        stub.GetRelease(registry_pb2.GetReleaseRequest(release_id=release_id))
    )
    assert code == grpc.StatusCode.NOT_FOUND


def _job(job_id: str, adapter: str, state: int, created: int) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        job_id=job_id,
        spec=trainer_pb2.JobSpec(adapter=adapter, team="support", base_model="tiny"),
        state=state,  # type: ignore[arg-type]
        created_at=Timestamp(seconds=1_700_000_000 + created),
    )


async def test_job_records(tmp_path: Path, nats_url: str, database_url: str) -> None:
    app = await _start(_settings(tmp_path, nats_url, database_url))
    try:
        await app.wait_ready()
        async with channel(app.address) as ch:
            stub = _stub(ch)
            queued, running = events_pb2.JOB_STATE_QUEUED, events_pb2.JOB_STATE_RUNNING
            first = await stub.PutJob(
                registry_pb2.PutJobRequest(job=_job("job-a", "bot-a", queued, 1))
            )
            assert first.revision == 1
            got = await stub.GetJob(registry_pb2.GetJobRecordRequest(job_id="job-a"))
            assert got == first

            # Replicas racing on the revision they read: exactly one write lands.
            updates = []
            for step in range(10):
                job = _job("job-a", "bot-a", running, 1)
                job.step = step
                updates.append(
                    _code_and_details(
                        stub.PutJob(registry_pb2.PutJobRequest(job=job, expected_revision=1))
                    )
                )
            outcomes = await asyncio.gather(*updates)
            assert sorted(code.name for code, _ in outcomes) == ["ABORTED"] * 9 + ["OK"]
            assert all("at revision 2, not 1" in d for c, d in outcomes if c != grpc.StatusCode.OK)
            now = await stub.GetJob(registry_pb2.GetJobRecordRequest(job_id="job-a"))
            assert (now.revision, now.job.state) == (2, running)

            code, _ = await _code_and_details(
                stub.PutJob(registry_pb2.PutJobRequest(job=_job("job-a", "bot-a", queued, 1)))
            )
            assert code == grpc.StatusCode.ALREADY_EXISTS
            code, _ = await _code_and_details(
                stub.GetJob(registry_pb2.GetJobRecordRequest(job_id="ghost"))
            )
            assert code == grpc.StatusCode.NOT_FOUND
            big = _job("job-big", "bot-a", queued, 2)
            big.spec.dataset_jsonl = b"x" * (1024 * 1024 + 1)
            code, details = await _code_and_details(
                stub.PutJob(registry_pb2.PutJobRequest(job=big))
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "dataset_jsonl" in details

            for i in range(5):
                await stub.PutJob(
                    registry_pb2.PutJobRequest(job=_job(f"job-b{i}", "bot-b", queued, 10 + i))
                )
            ids: list[str] = []
            token = ""
            while True:
                page = await stub.ListJobs(
                    registry_pb2.ListJobRecordsRequest(
                        adapter="bot-b", page_size=2, page_token=token
                    )
                )
                ids += [r.job.job_id for r in page.jobs]
                token = page.next_page_token
                if not token:
                    break
            assert ids == ["job-b4", "job-b3", "job-b2", "job-b1", "job-b0"]
            running_jobs = await stub.ListJobs(
                registry_pb2.ListJobRecordsRequest(team="support", states=[running])
            )
            assert [r.job.job_id for r in running_jobs.jobs] == ["job-a"]
    finally:
        await app.stop()


async def test_a_0001_database_upgrades_to_head(database_url: str) -> None:
    """Rows written by the first schema read back through the new code as "ready"."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import DateTime, bindparam, text

    from ftops_registry.db import MIGRATIONS_DIR, Database
    from ftops_registry.registry import Registry

    db = Database(database_url)
    try:
        with db.engine.connect() as conn:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
            conn.commit()
        rows = [
            "INSERT INTO base_models VALUES ('tiny', :fp, '/m', :t)",
            "INSERT INTO adapters VALUES ('old-bot', '', 'tiny', 1, :t)",
            "INSERT INTO artifacts VALUES (:fp, 1, :t)",
            "INSERT INTO versions (version_id, adapter, number, artifact_id, "
            "base_model_fingerprint, job_id, dataset_fingerprint, method, metrics, labels, "
            "archived, created_at) VALUES ('ver_0123456789', 'old-bot', 1, :fp, :fp, '', '', "
            "'lora', '{}', '{}', FALSE, :t)",
            "INSERT INTO aliases VALUES ('old-bot', 'prod', 'ver_0123456789', :t)",
        ]
        with db.engine.begin() as conn:
            for sql in rows:
                stmt = text(sql).bindparams(bindparam("t", type_=DateTime(timezone=True)))
                conn.execute(stmt, {"fp": FP, "t": datetime.now(UTC)})
        db.migrate()
        registry = Registry(db)
        version = registry.get_version("old-bot:1")
        assert version.state == "ready"
        assert not version.HasField("evaluation")
        assert registry.get_alias("old-bot", "prod").version_id == version.version_id
        assert registry.list_versions("old-bot").versions == [version]
    finally:
        db.close()


async def test_audit_log_records_mutations_and_refusals(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    admin_key = new_api_key()[1]
    settings = _settings(tmp_path, nats_url, database_url).model_copy(
        update={"auth_mode": "enabled", "bootstrap_admin_key": admin_key}
    )
    app = await _start(settings)
    try:
        await app.wait_ready()
        async with channel(app.address, api_key=admin_key) as ch:
            stub = _stub(ch)
            before = Timestamp()
            before.FromDatetime(datetime.now(UTC))
            await stub.RegisterBaseModel(
                registry_pb2.RegisterBaseModelRequest(name="tiny", fingerprint=FP, uri="/m/tiny")
            )
            # Explicit key: the client-streaming call does not get it from the channel here.
            artifact = await stub.UploadArtifact(
                # The channel's key must reach client-streaming calls too.
                _upload_requests(_files(ADAPTER_BLOBS), list(ADAPTER_BLOBS.values())),
            )
            register = registry_pb2.RegisterVersionRequest(
                adapter="audited-bot",
                team="support",
                base_model="tiny",
                artifact_id=artifact.artifact_id,
            )
            v1 = await stub.RegisterVersion(register)
            register.rejected = True
            bad = await stub.RegisterVersion(register)
            await stub.SetAlias(
                registry_pb2.SetAliasRequest(
                    adapter="audited-bot", name="stable", version_id=v1.version_id
                )
            )
            refusals = [(bad.version_id, "FAILED_PRECONDITION"), ("audited-bot:99", "NOT_FOUND")]
            for ref, _ in refusals:
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.SetAlias(
                        registry_pb2.SetAliasRequest(
                            adapter="audited-bot", name="stable", version_id=ref
                        )
                    )
            job = trainer_pb2.Job(
                job_id="job-audit",
                state=events_pb2.JOB_STATE_QUEUED,
                spec=trainer_pb2.JobSpec(adapter="audited-bot", team="support"),
            )
            await stub.PutJob(registry_pb2.PutJobRequest(job=job))
            with pytest.raises(grpc.aio.AioRpcError):  # exists already: ALREADY_EXISTS
                await stub.PutJob(registry_pb2.PutJobRequest(job=job))

            everything = await stub.ListAudit(registry_pb2.ListAuditRequest(page_size=500))
            # Release events and other services' refusals (audit.denied, resource
            # "service:<name>") that other tests published on the shared NATS may be replayed
            # to this app's consumers.
            entries = [
                e
                for e in everything.entries
                if not e.method.startswith("release.")
                and e.method != "BootstrapAdmin"
                and not e.resource.startswith("service:")
            ]
            key_id = admin_key.split("_")[1]
            assert {e.actor for e in entries} == {key_id}
            # Newest first.
            assert [e.id for e in entries] == sorted((e.id for e in entries), reverse=True)
            got = [(e.method, e.resource, e.outcome) for e in reversed(entries)]
            assert got == [
                ("RegisterBaseModel", "base_model:tiny", "ok"),
                ("UploadArtifact", f"artifact:{artifact.artifact_id}", "ok"),
                ("RegisterVersion", f"version:{v1.version_id}", "ok"),
                ("RegisterVersion", f"version:{bad.version_id}", "ok"),
                ("SetAlias", "alias:audited-bot/stable", "ok"),
                ("SetAlias", "alias:audited-bot/stable", "FAILED_PRECONDITION"),
                ("SetAlias", "alias:audited-bot/stable", "NOT_FOUND"),
                ("PutJob", "job:job-audit", "ok"),
                ("PutJob", "job:job-audit", "ALREADY_EXISTS"),
            ]
            assert "rejected" in entries[-4].detail
            assert "rejected by the evaluation gate" in entries[3].detail

            # Filters: team (refusals included via the adapter), resource prefix, time.
            team = await stub.ListAudit(registry_pb2.ListAuditRequest(team="support"))
            assert [e.id for e in team.entries] == [e.id for e in entries[:7]]
            alias = await stub.ListAudit(
                registry_pb2.ListAuditRequest(resource_prefix="alias:audited-bot/")
            )
            assert [e.outcome for e in alias.entries] == ["NOT_FOUND", "FAILED_PRECONDITION", "ok"]
            since_start = await stub.ListAudit(
                registry_pb2.ListAuditRequest(team="support", since=before)
            )
            assert len(since_start.entries) == 7
            later = Timestamp()
            later.FromDatetime(datetime.now(UTC))
            assert not (
                await stub.ListAudit(registry_pb2.ListAuditRequest(team="support", since=later))
            ).entries

            # Pagination: pages of 3 walk every entry exactly once, newest first.
            paged: list[int] = []
            token = ""
            while True:
                page = await stub.ListAudit(
                    registry_pb2.ListAuditRequest(team="support", page_size=3, page_token=token)
                )
                paged += [e.id for e in page.entries]
                token = page.next_page_token
                if not token:
                    break
            assert paged == [e.id for e in team.entries]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListAudit(registry_pb2.ListAuditRequest(page_token="nope"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await app.stop()


async def test_archive_and_garbage_collect_over_grpc(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    settings = _settings(tmp_path, nats_url, database_url).model_copy(
        update={"artifact_gc_grace_s": 0}
    )
    app = await _start(settings)
    try:
        await app.wait_ready()
        async with channel(app.address) as ch:
            stub = _stub(ch)
            await _base_and_artifact(stub)
            versions = []
            for n in range(3):
                art = await _upload(stub, {"adapter_model.safetensors": f"w{n}".encode() * 100})
                versions.append(
                    await stub.RegisterVersion(
                        registry_pb2.RegisterVersionRequest(
                            adapter="gc-bot", base_model="tiny", artifact_id=art.artifact_id
                        )
                    )
                )
            await stub.SetAlias(
                registry_pb2.SetAliasRequest(
                    adapter="gc-bot", name="prod", version_id=versions[0].version_id
                )
            )
            archived = await stub.ArchiveVersions(
                registry_pb2.ArchiveVersionsRequest(adapter="gc-bot", keep_last=1)
            )
            assert list(archived.archived_version_ids) == [versions[1].version_id]
            gc = await stub.GarbageCollectArtifacts(registry_pb2.GarbageCollectArtifactsRequest())
            # The unused first upload (ADAPTER_BLOBS) and version 2's artifact.
            assert versions[1].artifact_id in gc.deleted_artifact_ids
            assert len(gc.deleted_artifact_ids) == 2
            assert gc.freed_bytes > 3 * MIB
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _download(stub, versions[1].artifact_id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            for kept in (versions[0], versions[2]):
                await _download(stub, kept.artifact_id)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ArchiveVersions(
                    registry_pb2.ArchiveVersionsRequest(adapter="gc-bot", keep_last=0)
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            audit = await stub.ListAudit(registry_pb2.ListAuditRequest(page_size=500))
            # Other tests' release events and services' refusals (resource "service:…")
            # may reach this app's consumers on the shared NATS.
            mine = [
                (e.method, e.outcome)
                for e in audit.entries
                if "release" not in e.method and not e.resource.startswith("service:")
            ]
            assert mine[:3] == [
                ("ArchiveVersions", "INVALID_ARGUMENT"),
                ("GarbageCollectArtifacts", "ok"),
                ("ArchiveVersions", "ok"),
            ]
    finally:
        await app.stop()


async def _download(stub: registry_pb2_grpc.RegistryServiceAsyncStub, artifact_id: str) -> int:
    received = 0
    async for part in stub.DownloadArtifact(
        registry_pb2.DownloadArtifactRequest(artifact_id=artifact_id)
    ):
        received += len(part.chunk.data)
    return received


async def test_a_0002_database_upgrades_to_head(database_url: str) -> None:
    """0003 adds the audit table and artifacts.deleted_at next to existing rows."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import DateTime, bindparam, text

    from ftops_registry.audit import AuditLog
    from ftops_registry.db import MIGRATIONS_DIR, Database
    from ftops_registry.registry import Registry

    db = Database(database_url)
    try:
        with db.engine.connect() as conn:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = conn
            command.upgrade(config, "0002")
            conn.commit()
        rows = [
            "INSERT INTO base_models VALUES ('tiny', :fp, '/m', :t)",
            "INSERT INTO adapters VALUES ('old-bot', 'ops', 'tiny', 1, :t)",
            "INSERT INTO artifacts VALUES (:fp, 1, :t)",
            "INSERT INTO versions (version_id, adapter, number, artifact_id, "
            "base_model_fingerprint, job_id, dataset_fingerprint, method, metrics, labels, "
            "archived, created_at, state) VALUES ('ver_0123456789', 'old-bot', 1, :fp, :fp, "
            "'', '', 'lora', '{}', '{}', FALSE, :t, 'ready')",
        ]
        with db.engine.begin() as conn:
            for sql in rows:
                stmt = text(sql).bindparams(bindparam("t", type_=DateTime(timezone=True)))
                conn.execute(stmt, {"fp": FP, "t": datetime.now(UTC)})
        db.migrate()
        registry = Registry(db)
        assert registry.get_artifact(FP).artifact_id == FP  # deleted_at is NULL: live
        registry.set_alias("old-bot", "prod", "old-bot:1")
        entries = AuditLog(db).list(team="ops").entries
        assert [(e.method, e.resource) for e in entries] == [("SetAlias", "alias:old-bot/prod")]
    finally:
        db.close()
