"""The trainer's job reconciler against the real registry (SQLite) and real NATS: a job
recorded QUEUED whose queue message was lost is put back on its work queue once, and
runs; jobs on the queue, running, too fresh or of another queue are left alone."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import grpc
import pytest

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_devstack.servers import free_port, start_nats
from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime import client, events, hashing
from ftops_runtime.bus import EventBus
from ftops_tinymodel import new_facts
from ftops_trainer.app import TrainerApp
from ftops_trainer.reconciler import Reconciler
from ftops_trainer.settings import TrainerSettings
from ftops_trainer.store import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JobState = events_pb2.JobState
BASE = "tiny-base"
MakeRegistry = Callable[[], Awaitable[RegistryApp]]


@pytest.fixture
async def make_registry(tmp_path: Path, nats_url: str) -> AsyncIterator[MakeRegistry]:
    """Starts the registry on one fixed port and database, again after a stop (an
    outage)."""
    port = free_port()
    durable = f"registry-test-{uuid.uuid4().hex[:8]}"
    started: list[RegistryApp] = []

    async def make() -> RegistryApp:
        app = RegistryApp(
            RegistrySettings(
                grpc_port=port,
                nats_url=nats_url,
                database_url=f"sqlite:///{tmp_path}/registry.db",
                artifact_dir=tmp_path / "artifacts",
                health_interval_s=0.1,
                shutdown_grace_s=0.2,
                instance_id=f"reg-{uuid.uuid4().hex[:6]}",
                auth_mode="disabled",
            ),
            durable=durable,
        )
        await app.start()
        await app.wait_ready()
        started.append(app)
        return app

    yield make
    for app in started:
        await app.stop()


def registry_stub(channel: grpc.aio.Channel) -> registry_pb2_grpc.RegistryServiceAsyncStub:
    return cast(
        "registry_pb2_grpc.RegistryServiceAsyncStub", registry_pb2_grpc.RegistryServiceStub(channel)
    )


def record(job_id: str, queue: str, state: int, age_s: float) -> trainer_pb2.Job:
    job = trainer_pb2.Job(
        job_id=job_id,
        spec=trainer_pb2.JobSpec(adapter="bot", team="support"),
        state=cast("events_pb2.JobState.ValueType", state),
        queue=queue,
    )
    job.updated_at.FromSeconds(int(time.time() - age_s))
    job.created_at.CopyFrom(job.updated_at)
    return job


async def test_only_lost_jobs_of_its_queue_are_requeued_and_only_once(
    make_registry: MakeRegistry, nats_url: str
) -> None:
    registry_app = await make_registry()
    async with client.channel(registry_app.address) as channel:
        await _reconcile(JobStore(registry_stub(channel)), nats_url)


async def _reconcile(store: JobStore, nats_url: str) -> None:
    queue, other = f"q{uuid.uuid4().hex[:8]}", f"q{uuid.uuid4().hex[:8]}"
    subject = events.trainer_job_queue(queue)
    ids = {name: f"job_{name}_{uuid.uuid4().hex[:6]}" for name in ("lost", "held", "fresh")}
    ids |= {name: f"job_{name}_{uuid.uuid4().hex[:6]}" for name in ("running", "other")}
    async with EventBus(nats_url, service="test", instance=uuid.uuid4().hex[:6]) as bus:
        await bus.wait_ready(10)

        async def enqueue(job: trainer_pb2.Job, event_id: str) -> None:
            queued = events_pb2.JobEvent(
                meta=events.new_meta("test", "t"), job_id=job.job_id, state=job.state
            )
            queued.meta.event_id = event_id
            await bus.publish(subject, queued)

        hour = 3600.0
        queued_state = JobState.JOB_STATE_QUEUED
        for job in (
            record(ids["lost"], queue, queued_state, hour),
            record(ids["held"], queue, queued_state, hour),
            record(ids["fresh"], queue, queued_state, 0),  # a submit may still enqueue it
            record(ids["running"], queue, JobState.JOB_STATE_RUNNING, hour),
            record(ids["other"], other, queued_state, hour),  # another pool's job
        ):
            await store.create(job)
        await enqueue(record(ids["held"], queue, queued_state, 0), f"enqueue-{ids['held']}")

        # Two replicas of the queue reconcile at the same moment.
        replicas = [
            Reconciler(store, bus, enqueue, queue=queue, interval_s=60, grace_s=60)
            for _ in range(2)
        ]
        results = await asyncio.gather(*(r.reconcile_once() for r in replicas))
        assert ids["lost"] in results[0] + results[1]
        assert {job for result in results for job in result} == {ids["lost"]}
        on_queue = [e.job_id for e in await bus.stored(subject, events_pb2.JobEvent)]
        assert sorted(on_queue) == sorted([ids["held"], ids["lost"]])  # one message each
        # Nothing is lost any more: the next pass changes nothing.
        assert await replicas[0].reconcile_once() == []
        assert len(await bus.stored(subject, events_pb2.JobEvent)) == 2


async def test_a_job_stuck_queued_after_nats_and_the_registry_were_down_at_submit_runs(
    make_registry: MakeRegistry,
    tmp_path: Path,
    tiny_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The trainer stores the record, cannot enqueue (its NATS is down) and cannot mark
    the job failed (the registry went down meanwhile): the submit fails, the record stays
    QUEUED. Once both are back, the reconciler puts it on the queue and it trains."""
    registry_app = await make_registry()
    async with client.channel(registry_app.address) as channel:
        await registry_stub(channel).RegisterBaseModel(
            registry_pb2.RegisterBaseModelRequest(
                name=BASE,
                fingerprint=hashing.model_fingerprint(tiny_model_dir),
                uri=str(tiny_model_dir),
            )
        )
    nats_port = free_port()  # the trainer's NATS, not started yet
    trainer = TrainerApp(
        TrainerSettings(
            registry_address=registry_app.address,
            nats_url=f"nats://127.0.0.1:{nats_port}",
            work_dir=tmp_path / "work",
            checkpoint_dir=tmp_path / "checkpoints",
            grpc_port=0,
            progress_interval_s=0.1,
            job_queue=f"q{uuid.uuid4().hex[:8]}",
            instance_id="trainer-r",
            shutdown_grace_s=1,
            job_ack_wait_s=3,
            reconcile_interval_s=0.5,
            reconcile_grace_s=0.5,
            auth_mode="disabled",
        )
    )
    await trainer.start()
    nats = None
    try:
        async with (
            client.channel(trainer.address) as channel,
            client.channel(registry_app.address) as registry_channel,
        ):
            registry = registry_stub(registry_channel)
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            spec = trainer_pb2.JobSpec(
                adapter="support-bot",
                base_model=BASE,
                dataset_jsonl="\n".join(json.dumps(f) for f in new_facts()[:8]).encode(),
                hyperparameters=trainer_pb2.Hyperparameters(num_epochs=1, batch_size=4),
            )
            submit = asyncio.ensure_future(stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec)))
            stuck = await _first_record(registry, submit)
            await registry_app.stop()  # before the trainer gives up on NATS (5 s)
            with pytest.raises(grpc.aio.AioRpcError):
                await submit

            nats = start_nats(nats_port)
            back = await make_registry()  # the same port and database
        async with client.channel(back.address) as registry_channel:
            final = await _until_ended(registry_stub(registry_channel), stuck)
        # It trained to the end (what the evaluation gate then said is not at issue here).
        assert final.state in (JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_REJECTED)
        assert final.step == final.total_steps > 0
        assert final.attempts == 1  # enqueued once
        assert f"job {stuck} was QUEUED but not on work queue" in caplog.text
    finally:
        await trainer.stop()
        if nats is not None:
            nats.stop()


async def _job(
    registry: registry_pb2_grpc.RegistryServiceAsyncStub, job_id: str
) -> trainer_pb2.Job:
    reply: registry_pb2.JobRecord = await registry.GetJob(
        registry_pb2.GetJobRecordRequest(job_id=job_id)
    )
    return reply.job


async def _first_record(
    registry: registry_pb2_grpc.RegistryServiceAsyncStub, submit: asyncio.Future[object]
) -> str:
    """The id of the submitted job as soon as its record exists."""
    for _ in range(400):
        listed: registry_pb2.ListJobRecordsResponse = await registry.ListJobs(
            registry_pb2.ListJobRecordsRequest(adapter="support-bot")
        )
        if listed.jobs:
            return listed.jobs[0].job.job_id
        assert not submit.done(), "the submit ended before its record was written"
        await asyncio.sleep(0.02)
    raise AssertionError("no job record")


async def _until_ended(
    registry: registry_pb2_grpc.RegistryServiceAsyncStub, job_id: str, timeout: float = 180
) -> trainer_pb2.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            job: trainer_pb2.Job | None = await _job(registry, job_id)
        except grpc.aio.AioRpcError:
            job = None  # the registry is still coming back
        if job is not None and job.state not in (
            JobState.JOB_STATE_QUEUED,
            JobState.JOB_STATE_RUNNING,
        ):
            return job
        await asyncio.sleep(0.2)
    last = await _job(registry, job_id)
    raise AssertionError(f"job {job_id} still {JobState.Name(last.state)}")


async def test_a_job_lost_on_every_delivery_fails_after_its_requeues(
    make_registry: MakeRegistry, nats_url: str
) -> None:
    registry_app = await make_registry()
    queue = f"q{uuid.uuid4().hex[:8]}"
    job_id = f"job_doomed_{uuid.uuid4().hex[:6]}"
    requeued: list[str] = []

    async def lost_again(job: trainer_pb2.Job, event_id: str) -> None:
        # Enqueued, taken by a worker that is lost with it and handed back QUEUED (a new
        # revision), its message dead-lettered: as a job that kills its trainer each time.
        requeued.append(job.job_id)

        def handed_back(current: trainer_pb2.Job) -> bool:
            current.error = f"trainer lost (delivery {len(requeued)})"
            return True

        await store.update(job.job_id, handed_back)

    async with (
        client.channel(registry_app.address) as channel,
        EventBus(nats_url, service="test", instance=uuid.uuid4().hex[:6]) as bus,
    ):
        await bus.wait_ready(10)
        store = JobStore(registry_stub(channel))
        await store.create(record(job_id, queue, JobState.JOB_STATE_QUEUED, 3600.0))
        reconciler = Reconciler(
            store, bus, lost_again, queue=queue, interval_s=60, grace_s=0, max_requeues=2
        )
        assert await reconciler.reconcile_once() == [job_id]
        assert await reconciler.reconcile_once() == [job_id]
        assert await reconciler.reconcile_once() == []  # given up
        assert requeued == [job_id, job_id]
        failed = (await store.get(job_id)).job
        assert failed.state == JobState.JOB_STATE_FAILED
        assert "re-enqueued 2 times" in failed.error
        assert "trainer lost (delivery 2)" in failed.error
        assert await reconciler.reconcile_once() == []  # not QUEUED any more: left alone


async def test_passes_on_an_unchanged_record_do_not_count_as_requeues(
    make_registry: MakeRegistry, nats_url: str
) -> None:
    registry_app = await make_registry()
    queue = f"q{uuid.uuid4().hex[:8]}"
    job_id = f"job_waiting_{uuid.uuid4().hex[:6]}"

    async def dropped(job: trainer_pb2.Job, event_id: str) -> None:
        """The message never reaches the queue; nothing takes the job."""

    async with (
        client.channel(registry_app.address) as channel,
        EventBus(nats_url, service="test", instance=uuid.uuid4().hex[:6]) as bus,
    ):
        await bus.wait_ready(10)
        store = JobStore(registry_stub(channel))
        await store.create(record(job_id, queue, JobState.JOB_STATE_QUEUED, 3600.0))
        reconciler = Reconciler(
            store, bus, dropped, queue=queue, interval_s=60, grace_s=60, max_requeues=1
        )
        for _ in range(3):
            assert await reconciler.reconcile_once() == [job_id]
        assert (await store.get(job_id)).job.state == JobState.JOB_STATE_QUEUED
