"""A multi-node job over two trainer service instances (real registry, real NATS JetStream,
gloo on CPU): the replica that takes the job recruits the other through a gang slot, and
together they train the adapter one process trains."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file

import ftops_tinymodel
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_devstack.lifetime import die_with_parent
from ftops_devstack.servers import free_port
from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime import client, hashing
from ftops_runtime.artifacts import download_artifact
from ftops_trainer.app import TrainerApp
from ftops_trainer.settings import TrainerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BASE = "tiny-base"
JobState = events_pb2.JobState
Stub = Any  # trainer_pb2_grpc.TrainerServiceAsyncStub exists for type checking only


@dataclass
class Cluster:
    registry: Any
    registry_address: str
    queue: str
    stubs: list[Stub] = field(default_factory=list)
    add_trainer: Callable[..., Awaitable[Stub]] = field(default=cast(Any, None))


@pytest.fixture
async def start_cluster(
    tmp_path: Path, nats_url: str, tiny_model_dir: Path
) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    """``await start_cluster(n, **settings)``: a registry and n trainer replicas on a
    fresh queue; ``cluster.add_trainer()`` adds one more with the same settings."""
    apps: list[Any] = []
    channels: list[Any] = []

    async def start(replicas: int, **extra: Any) -> Cluster:
        registry_app = RegistryApp(
            RegistrySettings(
                grpc_port=0,
                nats_url=nats_url,
                database_url=f"sqlite:///{tmp_path}/registry.db",
                artifact_dir=tmp_path / "artifacts",
                health_interval_s=0.1,
                shutdown_grace_s=1,
                instance_id=f"reg-{uuid.uuid4().hex[:6]}",
                auth_mode="disabled",
            ),
            durable=f"registry-test-{uuid.uuid4().hex[:8]}",
        )
        await registry_app.start()
        await registry_app.wait_ready()
        apps.append(registry_app)
        reg_channel = client.channel(registry_app.address)
        channels.append(reg_channel)
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
        cluster = Cluster(registry, registry_app.address, f"test{uuid.uuid4().hex[:8]}")

        async def add_trainer() -> Stub:
            n = len(cluster.stubs)
            app = TrainerApp(
                TrainerSettings(
                    registry_address=registry_app.address,
                    nats_url=nats_url,
                    work_dir=tmp_path / f"work{n}",
                    checkpoint_dir=tmp_path / "checkpoints",  # shared by the replicas
                    grpc_port=0,
                    progress_interval_s=0.1,
                    watch_poll_s=0.1,
                    job_queue=cluster.queue,
                    instance_id=f"trainer-{n}",
                    shutdown_grace_s=1,
                    auth_mode="disabled",
                    job_ack_wait_s=10,
                    **extra,
                )
            )
            await app.start()
            await app.bus.wait_ready(10)
            apps.insert(0, app)  # stopped before the registry
            channel = client.channel(app.address)
            channels.append(channel)
            cluster.stubs.append(trainer_pb2_grpc.TrainerServiceStub(channel))
            return cluster.stubs[-1]

        cluster.add_trainer = add_trainer
        for _ in range(replicas):
            await add_trainer()
        return cluster

    try:
        yield start
    finally:
        for app in apps:
            await app.stop()
        for channel in channels:
            await channel.close()


def _spec(adapter: str, nodes: int) -> trainer_pb2.JobSpec:
    facts = ftops_tinymodel.new_facts()[:6]
    return trainer_pb2.JobSpec(
        adapter=adapter,
        base_model=BASE,
        dataset_jsonl="\n".join(json.dumps(f) for f in facts).encode(),
        # 6 records, 1 held out: batches of 4 then 1, so one node's shard of every
        # second step is empty and it must still take part in the gradient sum.
        hyperparameters=trainer_pb2.Hyperparameters(
            num_epochs=2, batch_size=4, learning_rate=5e-3, nodes=nodes, world_size=1
        ),
        gate=trainer_pb2.GateConfig(disabled=True),
        replay=trainer_pb2.ReplayConfig(ratio=0),
    )


async def _train(stub: Stub, spec: trainer_pb2.JobSpec) -> trainer_pb2.Job:
    job = await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    return await _train_until_done(stub, job.job_id)


async def _train_until_done(stub: Stub, job_id: str) -> trainer_pb2.Job:
    request = trainer_pb2.GetJobRequest(job_id=job_id)
    seen = [j async for j in stub.WatchJob(request, timeout=240)]
    final: trainer_pb2.Job = seen[-1]
    return final


async def _adapter(
    registry: registry_pb2_grpc.RegistryServiceAsyncStub, version_id: str, dest: Path
) -> dict[str, torch.Tensor]:
    version = await registry.GetVersion(registry_pb2.GetVersionRequest(version_id=version_id))
    await download_artifact(registry, version.artifact_id, dest, label=version_id)
    return load_file(dest / "adapter_model.safetensors")


async def test_two_replicas_train_one_job_as_two_nodes_like_one_process(
    start_cluster: Callable[..., Awaitable[Cluster]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = await start_cluster(2, gang_timeout_s=60, distributed_timeout_s=60)
    registry, stubs = cluster.registry, cluster.stubs
    single = await _train(stubs[0], _spec("single-bot", nodes=1))
    assert single.state == JobState.JOB_STATE_SUCCEEDED, single.error

    with caplog.at_level(logging.INFO, logger="ftops_trainer"):
        gang = await _train(stubs[1], _spec("gang-bot", nodes=2))
    assert gang.state == JobState.JOB_STATE_SUCCEEDED, gang.error
    assert gang.spec.hyperparameters.nodes == 2
    assert gang.attempts == 1
    # Node 1 ran on the replica that did not take the job.
    members = [r for r in caplog.records if "training as node 1 of 2" in r.getMessage()]
    assert len(members) == 1
    assert gang.worker in ("trainer-0", "trainer-1")

    assert gang.step == gang.total_steps == single.total_steps == 4
    assert gang.loss == pytest.approx(single.loss, rel=1e-5)
    one = await _adapter(registry, single.version_id, tmp_path / "one")
    two = await _adapter(registry, gang.version_id, tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-4, rtol=1e-3), key


async def test_a_gang_that_cannot_form_fails_the_job_clearly(
    start_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    # One replica, two nodes asked for: nobody takes the member slot (the replica itself
    # is busy with the job and passes it on) until the gang timeout.
    cluster = await start_cluster(1, gang_timeout_s=2)
    final = await _train(cluster.stubs[0], _spec("lonely-bot", nodes=2))
    assert final.state == JobState.JOB_STATE_FAILED
    assert "gang did not form within 2 s: 0 of 1 member node(s) joined" in final.error
    assert not final.version_id


async def test_a_member_killed_mid_run_sends_the_job_back_to_resume_from_its_checkpoint(
    start_cluster: Callable[..., Awaitable[Cluster]], tmp_path: Path, nats_url: str
) -> None:
    """SIGKILL the member replica (its workers die with it): node 0's collectives fail
    instead of hanging, the job goes back to the queue, and the next attempt forms a new
    gang with a fresh replica and resumes from the last checkpoint."""
    cluster = await start_cluster(1, gang_timeout_s=60, distributed_timeout_s=30)
    spec = _spec("killed-member-bot", nodes=2)
    spec.hyperparameters.num_epochs = 20  # 40 steps: time to kill it mid-run
    spec.hyperparameters.checkpoint_every = 5
    # Node 0 is the only replica: it takes the job and waits for a member.
    job = await cluster.stubs[0].SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    environ = {
        **os.environ,
        "FTOPS_REGISTRY_ADDRESS": cluster.registry_address,
        "FTOPS_NATS_URL": nats_url,
        "FTOPS_WORK_DIR": str(tmp_path / "doomed"),
        "FTOPS_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "FTOPS_JOB_QUEUE": cluster.queue,
        "FTOPS_JOB_ACK_WAIT_S": "10",
        "FTOPS_INSTANCE_ID": "doomed",
        "FTOPS_GRPC_PORT": str(free_port()),
        "FTOPS_AUTH_MODE": "disabled",
        "FTOPS_DEV_MODE": "true",  # auth may be off only in development mode
        "FTOPS_DISTRIBUTED_TIMEOUT_S": "30",
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
        request = trainer_pb2.GetJobRequest(job_id=job.job_id)
        async for update in cluster.stubs[0].WatchJob(request, timeout=120):
            if update.step >= 12:
                break
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
        await cluster.add_trainer()  # the next attempt's member
        final = await _train_until_done(cluster.stubs[0], job.job_id)
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()
    assert final.state == JobState.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 2
    assert final.resumed_from_step >= 10
    assert final.step == final.total_steps == 40
