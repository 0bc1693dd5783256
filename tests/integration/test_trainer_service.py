"""The trainer over real gRPC with the real registry service (SQLite), real NATS JetStream
(the shared job queue) and real training on the tiny model."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from nats.js.api import DeliverPolicy

import ftops_tinymodel
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_devstack.lifetime import die_with_parent
from ftops_devstack.servers import free_port
from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime import client, events, hashing
from ftops_runtime.bus import Delivery, EventBus
from ftops_trainer.app import TrainerApp
from ftops_trainer.settings import TrainerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BASE = "tiny-base"
JobState = events_pb2.JobState
FAST = trainer_pb2.Hyperparameters(num_epochs=4, batch_size=4)
# The dev demo's recipe: the trainer's defaults with half the batch replayed. The tiny
# model learns its facts word for word this way and keeps ~0.87 of what it knew: under the
# production retention gate (0.95), so these jobs ask for the dev stack's 0.3.
LEARNING_REPLAY = trainer_pb2.ReplayConfig(ratio=0.5)
TINY_GATE = trainer_pb2.GateConfig(min_retention=0.3)
# Keeps the tiny model's retention above the default gate by learning none of its facts
# (bench/forgetting.py): a gentle rate on the MLP output only, a large share of replay.
GENTLE = trainer_pb2.Hyperparameters(num_epochs=10, batch_size=8, learning_rate=5e-4)
GENTLE_LORA = trainer_pb2.LoraConfig(target_modules=["down_proj"])
GENTLE_REPLAY = trainer_pb2.ReplayConfig(ratio=0.8)


@dataclass
class Env:
    registry: registry_pb2_grpc.RegistryServiceAsyncStub
    trainers: list[TrainerApp]
    stubs: list[trainer_pb2_grpc.TrainerServiceAsyncStub]
    queue: str
    make_trainer: Callable[..., Any]

    @property
    def stub(self) -> trainer_pb2_grpc.TrainerServiceAsyncStub:
        return self.stubs[0]


@pytest.fixture
async def env(tmp_path: Path, nats_url: str, tiny_model_dir: Path) -> AsyncIterator[Env]:
    registry_app = RegistryApp(
        RegistrySettings(
            grpc_port=0,
            nats_url=nats_url,
            database_url=f"sqlite:///{tmp_path}/registry.db",
            artifact_dir=tmp_path / "artifacts",
            health_interval_s=0.1,
            shutdown_grace_s=1,
            instance_id=f"reg-{uuid.uuid4().hex[:6]}",
            auth_mode="disabled",  # the trainer, not access control, is under test here
        ),
        durable=f"registry-test-{uuid.uuid4().hex[:8]}",
    )
    await registry_app.start()
    await registry_app.wait_ready()
    reg_channel = client.channel(registry_app.address)
    registry = cast(
        "registry_pb2_grpc.RegistryServiceAsyncStub",
        registry_pb2_grpc.RegistryServiceStub(reg_channel),
    )
    await registry.RegisterBaseModel(
        registry_pb2.RegisterBaseModelRequest(
            name=BASE,
            fingerprint=hashing.model_fingerprint(tiny_model_dir),
            uri=str(tiny_model_dir),
        )
    )
    queue = f"test{uuid.uuid4().hex[:8]}"
    channels: list[grpc.aio.Channel] = [reg_channel]
    environment = Env(registry, [], [], queue, lambda: None)

    async def make_trainer(**extra: Any) -> TrainerApp:
        n = len(environment.trainers)
        # Every replica binds the queue's consumer with its ack wait, the last one's wins:
        # short everywhere, so a killed replica's job comes back in seconds.
        extra.setdefault("job_ack_wait_s", 3)
        settings = TrainerSettings(
            registry_address=registry_app.address,
            nats_url=nats_url,
            work_dir=tmp_path / f"work{n}",
            checkpoint_dir=tmp_path / "checkpoints",  # shared by the replicas
            grpc_port=0,
            progress_interval_s=0.1,
            watch_poll_s=0.1,
            job_queue=queue,
            instance_id=f"trainer-{n}",
            shutdown_grace_s=1,
            auth_mode="disabled",  # access control has its own tests (test_access_control.py)
            **extra,
        )
        app = TrainerApp(settings)
        await app.start()
        await app.bus.wait_ready(10)
        channel = client.channel(app.address)
        channels.append(channel)
        environment.trainers.append(app)
        environment.stubs.append(trainer_pb2_grpc.TrainerServiceStub(channel))  # type: ignore[arg-type]
        return app

    environment.make_trainer = make_trainer
    await make_trainer()
    try:
        yield environment
    finally:
        for app in environment.trainers:
            await app.stop()
        for channel in channels:
            await channel.close()
        await registry_app.stop()


class Collector:
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def handle(self, event: Any, delivery: Delivery) -> None:
        self.events.append(event)

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 20) -> Any:
        for _ in range(int(timeout / 0.1)):
            for event in self.events:
                if predicate(event):
                    return event
            await asyncio.sleep(0.1)
        raise AssertionError(f"no matching event among {len(self.events)}")


@pytest.fixture
async def announced(nats_url: str) -> AsyncIterator[dict[str, Collector]]:
    bus = EventBus(nats_url, service="test", instance=uuid.uuid4().hex[:6])
    collectors = {events.ADAPTER_READY: Collector(), events.ADAPTER_REJECTED: Collector()}
    for subject, collector in collectors.items():
        bus.subscribe(
            subject,
            f"t-{uuid.uuid4().hex[:8]}",
            collector.handle,
            deliver_policy=DeliverPolicy.NEW,
        )
    await bus.start()
    await bus.wait_ready(10)
    await asyncio.sleep(0.3)  # consumers exist before anything is published
    yield collectors
    await bus.close()


def facts_jsonl(n: int, start: int = 0) -> bytes:
    facts = ftops_tinymodel.new_facts()[start : start + n]
    return "\n".join(json.dumps(f) for f in facts).encode()


async def watch_until_done(stub: Any, job_id: str, timeout: float = 180) -> list[trainer_pb2.Job]:
    seen = []
    async for job in stub.WatchJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=timeout):
        seen.append(job)
    return seen


async def test_job_trains_evaluates_registers_and_announces(
    env: Env, announced: dict[str, Collector]
) -> None:
    spec = trainer_pb2.JobSpec(
        adapter="support-bot",
        team="support",
        base_model=BASE,
        dataset_jsonl=facts_jsonl(8),
        replay=LEARNING_REPLAY,
        gate=TINY_GATE,
        labels={"ticket": "T-1"},
    )
    job = await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec, idempotency_key="k1"))
    assert job.state == JobState.JOB_STATE_QUEUED
    assert (job.spec.method, job.spec.lora.r, job.spec.replay.ratio) == ("lora", 8, 0.5)
    # No targets named: the record shows the architecture's default it trains.
    assert list(job.spec.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert job.spec.gate.min_retention == 0.3  # the job's own
    assert job.spec.WhichOneof("dataset") == "dataset_artifact_id"  # stored, not inline
    again = await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec, idempotency_key="k1"))
    assert again.job_id == job.job_id
    other = trainer_pb2.JobSpec()
    other.CopyFrom(spec)
    other.adapter = "other"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=other, idempotency_key="k1"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    seen = await watch_until_done(env.stub, job.job_id)
    final = seen[-1]
    assert final.state == JobState.JOB_STATE_SUCCEEDED, final.error
    assert JobState.JOB_STATE_RUNNING in [j.state for j in seen]
    assert final.step == final.total_steps > 0
    assert final.loss > 0
    assert final.learning_rate >= 0
    assert final.records_total == 8
    assert next(s.name for s in final.stages) == "cleaning"
    assert final.evaluation.gate_passed, final.evaluation.reasons
    assert "retention" in final.evaluation.metrics
    assert final.evaluation.metrics["learned"] >= 0.9  # its own facts, word for word
    assert final.evaluation.metrics["learned_parent_exact_match"] == 0.0

    version = await env.registry.GetVersion(
        registry_pb2.GetVersionRequest(version_id=final.version_id)
    )
    assert (version.state, version.number, version.job_id) == ("ready", 1, job.job_id)
    assert version.dataset_fingerprint == hashlib.sha256(spec.dataset_jsonl).hexdigest()
    assert version.replay_artifact_id
    assert version.dataset_artifact_id
    assert version.evaluation.gate_passed
    assert dict(version.labels) == {"ticket": "T-1"}
    assert sorted(f.path for f in version.files) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    event = await announced[events.ADAPTER_READY].wait_for(lambda e: e.job_id == job.job_id)
    assert (event.version_id, event.version_number, event.base_model) == (
        version.version_id,
        1,
        BASE,
    )

    listed = await env.stub.ListJobs(trainer_pb2.ListJobsRequest(adapter="support-bot"))
    assert [j.job_id for j in listed.jobs] == [job.job_id]

    # Continue from that version: parent adapter and its replay buffer are downloaded.
    child_spec = trainer_pb2.JobSpec(
        adapter="support-bot",
        base_model=BASE,
        parent_version_id=version.version_id,
        dataset_jsonl=facts_jsonl(8, start=8),
        replay=LEARNING_REPLAY,
        gate=TINY_GATE,
    )
    child = await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=child_spec))
    child_final = (await watch_until_done(env.stub, child.job_id))[-1]
    assert child_final.state == JobState.JOB_STATE_SUCCEEDED, child_final.error
    assert child_final.replay_records > 0
    # Checked against the base model too, not only the parent.
    assert 0.3 <= child_final.evaluation.metrics["retention_vs_base"] < 1.0
    assert child_final.evaluation.metrics["learned"] >= 0.9
    child_version = await env.registry.GetVersion(
        registry_pb2.GetVersionRequest(version_id=child_final.version_id)
    )
    assert child_version.number == 2
    assert child_version.parent_version_id == version.version_id


async def test_the_gate_rejects_and_announces_rejection(
    env: Env, announced: dict[str, Collector]
) -> None:
    spec = trainer_pb2.JobSpec(
        adapter="strict-bot",
        base_model=BASE,
        dataset_jsonl=facts_jsonl(8),
        hyperparameters=FAST,
        # Retention above 1 is impossible to reach: the gate must refuse.
        gate=trainer_pb2.GateConfig(min_retention=1.5),
    )
    job = await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    final = (await watch_until_done(env.stub, job.job_id))[-1]
    assert final.state == JobState.JOB_STATE_REJECTED, final.error
    assert not final.evaluation.gate_passed
    assert any("retention" in r for r in final.evaluation.reasons)
    version = await env.registry.GetVersion(
        registry_pb2.GetVersionRequest(version_id=final.version_id)
    )
    assert version.state == "rejected"
    event = await announced[events.ADAPTER_REJECTED].wait_for(lambda e: e.job_id == job.job_id)
    assert event.version_id == version.version_id
    assert event.reasons
    assert not [e for e in announced[events.ADAPTER_READY].events if e.job_id == job.job_id]


async def test_the_gate_rejects_a_version_that_learned_none_of_its_records(env: Env) -> None:
    """The gentle recipe keeps what the base knew and lowers the new data's loss, and
    answers none of its new facts: rejected with those figures (issue 16)."""
    spec = trainer_pb2.JobSpec(
        adapter="gentle-bot",
        base_model=BASE,
        dataset_jsonl=facts_jsonl(8),
        hyperparameters=GENTLE,
        lora=GENTLE_LORA,
        replay=GENTLE_REPLAY,
    )
    job = await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    final = (await watch_until_done(env.stub, job.job_id))[-1]
    assert final.state == JobState.JOB_STATE_REJECTED, final.error
    metrics = final.evaluation.metrics
    assert metrics["learned"] < 0.9 <= metrics["min_learned"]
    assert metrics["retention"] >= 0.95  # it kept everything: learning is what it lacked
    assert [r for r in final.evaluation.reasons if "did not learn what it was given" in r]
    assert "learned" in final.error


async def test_bad_input_fails_at_submit_and_stores_nothing(env: Env) -> None:
    bad = b'{"text": "fine"}\n{"prompt": "p", "completion": "c"}\n{not json at all\n'
    cases: list[tuple[trainer_pb2.JobSpec, grpc.StatusCode, str]] = [
        (
            trainer_pb2.JobSpec(adapter="bad-data", base_model=BASE, dataset_jsonl=bad),
            grpc.StatusCode.INVALID_ARGUMENT,
            "line 3: invalid JSON",
        ),
        (
            trainer_pb2.JobSpec(adapter="bad-data", base_model="nope", dataset_jsonl=bad),
            grpc.StatusCode.NOT_FOUND,
            "'nope' is not registered",
        ),
        (
            trainer_pb2.JobSpec(
                adapter="bad-data",
                base_model=BASE,
                parent_version_id="ver_missing",
                dataset_jsonl=facts_jsonl(2),
            ),
            grpc.StatusCode.NOT_FOUND,
            "parent version",
        ),
        (
            trainer_pb2.JobSpec(adapter="bad-data", base_model=BASE, dataset_uri="/etc/passwd"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dataset_uri",
        ),
        (
            trainer_pb2.JobSpec(
                adapter="bad-data", base_model=BASE, method="qlora", dataset_jsonl=facts_jsonl(2)
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "'lora'",
        ),
        (
            trainer_pb2.JobSpec(adapter="Bad Name", base_model=BASE, dataset_jsonl=b"{}"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "adapter",
        ),
        (
            trainer_pb2.JobSpec(adapter="ok", base_model=BASE),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dataset",
        ),
        (
            trainer_pb2.JobSpec(adapter="bad-data", base_model=BASE, dataset_jsonl=b"\n\n"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "empty",
        ),
        (
            trainer_pb2.JobSpec(
                adapter="bad-data",
                base_model=BASE,
                dataset_jsonl=facts_jsonl(2),
                hyperparameters=trainer_pb2.Hyperparameters(world_size=2, parallelism="zero3"),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "parallelism",
        ),
        (
            trainer_pb2.JobSpec(
                adapter="bad-data",
                base_model=BASE,
                dataset_jsonl=facts_jsonl(2),
                lora=trainer_pb2.LoraConfig(target_modules=["q_proj", "c_attn"]),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "target module 'c_attn' is not in the base model",
        ),
    ]
    for spec, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
        assert err.value.code() == code, (message, err.value.details())
        assert message in (err.value.details() or ""), err.value.details()
    listed = await env.stub.ListJobs(trainer_pb2.ListJobsRequest(adapter="bad-data"))
    assert not listed.jobs
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await env.stub.GetJob(trainer_pb2.GetJobRequest(job_id="job_missing"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_stops_a_running_job(env: Env) -> None:
    spec = trainer_pb2.JobSpec(
        adapter="cancel-bot",
        base_model=BASE,
        dataset_jsonl=facts_jsonl(8),
        hyperparameters=trainer_pb2.Hyperparameters(num_epochs=400, batch_size=2),
    )
    job = await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    async for update in env.stub.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id)):
        if update.step > 2:
            break
    cancelled = await env.stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id))
    assert cancelled.state == JobState.JOB_STATE_CANCELLED
    final = (await watch_until_done(env.stub, job.job_id))[-1]
    assert final.state == JobState.JOB_STATE_CANCELLED
    assert not final.version_id
    # Cancelling again is a no-op (a retried call), not an error.
    again = await env.stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id))
    assert again.state == JobState.JOB_STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as none:  # nothing was registered
        await env.registry.ListVersions(registry_pb2.ListVersionsRequest(adapter="cancel-bot"))
    assert none.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_job_interrupted_on_one_replica_resumes_on_another(env: Env) -> None:
    second = await env.make_trainer()
    first = env.trainers[0]
    spec = trainer_pb2.JobSpec(
        adapter="resume-bot",
        base_model=BASE,
        dataset_jsonl=facts_jsonl(8),
        # Long enough that it cannot finish while the replica shuts down.
        hyperparameters=trainer_pb2.Hyperparameters(
            num_epochs=300, batch_size=4, checkpoint_every=5
        ),
        gate=trainer_pb2.GateConfig(disabled=True),  # this test is about resuming
        replay=trainer_pb2.ReplayConfig(ratio=0),  # 8 records: 2 steps an epoch
    )
    job = await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    runner: TrainerApp | None = None
    async for update in env.stub.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id)):
        if update.step >= 12:
            runner = first if update.worker == first.settings.instance_id else second
            break
    assert runner is not None
    await runner.stop()  # SIGTERM path: the job goes back to the queue
    env.trainers.remove(runner)
    survivor = env.stubs[1] if runner is first else env.stubs[0]
    final = (await watch_until_done(survivor, job.job_id))[-1]
    assert final.state == JobState.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 2
    assert final.worker != runner.settings.instance_id
    assert final.resumed_from_step >= 10
    assert final.step == final.total_steps == 600


async def test_a_killed_replica_loses_no_job(env: Env, tmp_path: Path, nats_url: str) -> None:
    """SIGKILL mid-job: no goodbye, no requeue. The queue redelivers the job once the dead
    replica's heartbeats stop, and a live replica resumes it from the last checkpoint."""
    survivor = env.trainers[0]
    await survivor.stop()  # restarted below with a short heartbeat deadline
    env.trainers.clear()
    env.stubs.clear()
    registry_address = survivor.settings.registry_address
    environ = {
        **os.environ,
        "FTOPS_REGISTRY_ADDRESS": registry_address,
        "FTOPS_NATS_URL": nats_url,
        "FTOPS_WORK_DIR": str(tmp_path / "doomed"),
        "FTOPS_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "FTOPS_JOB_QUEUE": env.queue,
        "FTOPS_JOB_ACK_WAIT_S": "3",
        "FTOPS_INSTANCE_ID": "doomed",
        "FTOPS_GRPC_PORT": str(free_port()),
        "FTOPS_TORCH_THREADS": "1",
        "FTOPS_AUTH_MODE": "disabled",
        "FTOPS_DEV_MODE": "true",  # auth may be off only in development mode
        # Progress seen early enough to kill it mid-job even on an idle machine.
        "FTOPS_PROGRESS_INTERVAL_S": "0.1",
        "FTOPS_WATCH_POLL_S": "0.1",
    }
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ftops_trainer",
        env=environ,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=die_with_parent(),
    )
    try:
        address = f"127.0.0.1:{environ['FTOPS_GRPC_PORT']}"
        async with client.channel(address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            spec = trainer_pb2.JobSpec(
                adapter="killed-bot",
                base_model=BASE,
                dataset_jsonl=facts_jsonl(8),
                hyperparameters=trainer_pb2.Hyperparameters(
                    num_epochs=40, batch_size=4, checkpoint_every=5
                ),
                gate=trainer_pb2.GateConfig(disabled=True),
                replay=trainer_pb2.ReplayConfig(ratio=0),
            )
            for _ in range(300):  # the process is still starting
                try:
                    job = await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec), timeout=5)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.2)
            async for update in stub.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id)):
                if update.step >= 12:
                    break
        doomed.kill()
        await doomed.wait()
        await env.make_trainer()
        final = (await watch_until_done(env.stub, job.job_id))[-1]
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()
    assert final.state == JobState.JOB_STATE_SUCCEEDED, final.error
    assert final.worker == env.trainers[0].settings.instance_id
    assert final.attempts == 2
    assert final.resumed_from_step >= 10
    assert final.step == final.total_steps == 80


async def test_a_job_trains_in_two_workers_with_a_sharded_base(env: Env) -> None:
    # DDP/FSDP equality with one process is unit-tested; this drives the spec through the
    # service (the sharded mode exercises the most machinery).
    spec = trainer_pb2.JobSpec(
        adapter="fsdp-bot",
        base_model=BASE,
        dataset_jsonl=facts_jsonl(8),
        hyperparameters=trainer_pb2.Hyperparameters(
            num_epochs=2, batch_size=4, world_size=2, parallelism="fsdp"
        ),
        gate=trainer_pb2.GateConfig(disabled=True),
        replay=trainer_pb2.ReplayConfig(ratio=0),
    )
    job = await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    final = (await watch_until_done(env.stub, job.job_id))[-1]
    assert final.state == JobState.JOB_STATE_SUCCEEDED, final.error
    assert final.step == final.total_steps == 4
    assert final.spec.hyperparameters.world_size == 2
    assert final.spec.hyperparameters.parallelism == "fsdp"


async def test_skipped_lines_are_reported_with_their_numbers(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        json.dumps({"prompt": f"Widget W-{i} costs", "completion": f" {i} credits."})
        for i in range(1000)
    ]
    bad = {3: "{oops", 250: '{"question": "q"}', 500: "[1]", 750: '{"text": ""}', 1000: "{"}
    for line, text in bad.items():
        rows[line - 1] = text
    spec = trainer_pb2.JobSpec(
        adapter="skippy-bot",
        base_model=BASE,
        dataset_jsonl="\n".join(rows).encode(),
        hyperparameters=trainer_pb2.Hyperparameters(max_steps=1, batch_size=4),
        gate=trainer_pb2.GateConfig(disabled=True, holdout_fraction=0.02),
        replay=trainer_pb2.ReplayConfig(ratio=0),
    )
    with caplog.at_level("WARNING", logger="ftops_trainer"):
        job = await env.stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
        seen = [job, await env.stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))]
        seen += await watch_until_done(env.stub, job.job_id)
    final = seen[-1]
    assert final.state == JobState.JOB_STATE_SUCCEEDED, final.error
    # At submit, in GetJob, on the watch stream and in the finished record: which and why.
    for record in seen:
        assert (record.records_total, record.records_skipped) == (1000, 5)
        assert [s.line for s in record.skipped_lines] == sorted(bad)
    reasons = {s.line: s.reason for s in final.skipped_lines}
    assert reasons[3].startswith("invalid JSON")
    assert "unknown format" in reasons[250]
    assert "JSON object" in reasons[500]
    assert '"text"' in reasons[750]
    # And in the trainer's log, at submit and when the job ran.
    logged = [r.getMessage() for r in caplog.records if "dataset lines skipped" in r.getMessage()]
    assert len(logged) >= 2
    assert "5 of 1000 dataset lines skipped (line 3: invalid JSON" in logged[0]
    assert "line 1000: invalid JSON" in logged[0]


async def test_a_method_the_serving_backend_cannot_serve_is_refused_at_submit(env: Env) -> None:
    # A replica of a deployment that serves with vLLM (LoRA only): an IA3 job is refused
    # before anything is stored, naming the backend.
    await env.make_trainer(serving_backend="vllm")
    vllm = env.stubs[-1]
    spec = trainer_pb2.JobSpec(
        adapter="ia3-bot", base_model=BASE, method="ia3", dataset_jsonl=facts_jsonl(2)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await vllm.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "configured serving backend 'vllm'" in (err.value.details() or "")
    assert not (await vllm.ListJobs(trainer_pb2.ListJobsRequest(adapter="ia3-bot"))).jobs
