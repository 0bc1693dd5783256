"""A multi-node job over two trainer service instances (real registry, real NATS JetStream,
gloo on CPU): the replica that takes the job recruits the other through a gang slot, and
together they train the adapter one process trains."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file

import ftops_tinymodel
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
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
Cluster = Callable[..., Awaitable[tuple[Any, list[Stub]]]]


@pytest.fixture
async def cluster(tmp_path: Path, nats_url: str, tiny_model_dir: Path) -> AsyncIterator[Cluster]:
    """``await cluster(n, **settings)``: a registry and n trainer replicas on a fresh queue."""
    apps: list[Any] = []
    channels: list[Any] = []

    async def start(replicas: int, **extra: Any) -> tuple[Any, list[Stub]]:
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
        queue = f"test{uuid.uuid4().hex[:8]}"
        stubs: list[Stub] = []
        for n in range(replicas):
            app = TrainerApp(
                TrainerSettings(
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
                    auth_mode="disabled",
                    job_ack_wait_s=10,
                    distributed_timeout_s=60,
                    **extra,
                )
            )
            await app.start()
            await app.bus.wait_ready(10)
            apps.insert(0, app)  # stopped before the registry
            channel = client.channel(app.address)
            channels.append(channel)
            stubs.append(trainer_pb2_grpc.TrainerServiceStub(channel))
        return registry, stubs

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
    seen = [
        j async for j in stub.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=240)
    ]
    final: trainer_pb2.Job = seen[-1]
    return final


async def _adapter(
    registry: registry_pb2_grpc.RegistryServiceAsyncStub, version_id: str, dest: Path
) -> dict[str, torch.Tensor]:
    version = await registry.GetVersion(registry_pb2.GetVersionRequest(version_id=version_id))
    await download_artifact(registry, version.artifact_id, dest, label=version_id)
    return load_file(dest / "adapter_model.safetensors")


async def test_two_replicas_train_one_job_as_two_nodes_like_one_process(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry, stubs = await cluster(2, gang_timeout_s=60)
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


async def test_a_gang_that_cannot_form_fails_the_job_clearly(cluster: Cluster) -> None:
    # One replica, two nodes asked for: nobody takes the member slot (the replica itself
    # is busy with the job and passes it on) until the gang timeout.
    _, stubs = await cluster(1, gang_timeout_s=2)
    final = await _train(stubs[0], _spec("lonely-bot", nodes=2))
    assert final.state == JobState.JOB_STATE_FAILED
    assert "gang did not form within 2 s: 0 of 1 member node(s) joined" in final.error
    assert not final.version_id
