"""Where data-parallel workers run (backend, device, GPU count checks) and how a
multi-node gang forms, without CUDA and without NATS (a real TCPStore on localhost)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from google.protobuf.message import Message

from ftops.trainer.v1 import trainer_pb2
from ftops_cli.spec import build_job_spec, load_spec_file
from ftops_runtime.errors import InvalidArgument
from ftops_trainer.distributed import (
    placement,
    worker_device_type,
    world_size_problem,
)
from ftops_trainer.gang import GangFailed, Leader, Member, gang_subject, slot_expired
from ftops_trainer.settings import TrainerSettings
from ftops_trainer.spec import validate_placement, validate_spec

# -- backend and device ----------------------------------------------------------------


def test_a_cuda_worker_takes_the_gpu_of_its_local_rank_over_nccl() -> None:
    for local_rank in range(4):
        p = placement("cuda", local_rank, gpu_count=4)
        assert p.backend == "nccl"
        assert p.device == torch.device("cuda", local_rank)


def test_a_cpu_worker_stays_on_gloo_whatever_the_gpus() -> None:
    for gpus in (0, 8):
        p = placement("cpu", 3, gpu_count=gpus)
        assert (p.backend, p.device) == ("gloo", torch.device("cpu"))


def test_a_worker_without_its_own_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="needs GPU 2, but this node has 2 visible"):
        placement("cuda", 2, gpu_count=2)
    with pytest.raises(ValueError, match="unknown device type"):
        placement("tpu", 0, gpu_count=0)


def test_the_job_device_setting_picks_the_worker_device_type() -> None:
    assert worker_device_type("auto", cuda_available=True) == "cuda"
    assert worker_device_type("auto", cuda_available=False) == "cpu"
    assert worker_device_type("cpu", cuda_available=True) == "cpu"
    assert worker_device_type("cuda", cuda_available=True) == "cuda"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        worker_device_type("cuda", cuda_available=False)


def test_world_size_may_not_exceed_the_gpu_count_on_cuda_only() -> None:
    assert world_size_problem("cuda", 2, gpu_count=2) is None
    assert "needs 3 GPUs" in (world_size_problem("cuda", 3, gpu_count=2) or "")
    assert world_size_problem("cpu", 16, gpu_count=0) is None


def _spec(world_size: int = 0, nodes: int = 0) -> trainer_pb2.JobSpec:
    return trainer_pb2.JobSpec(
        adapter="bot",
        base_model="tiny",
        dataset_jsonl=b'{"text": "x"}\n',
        hyperparameters=trainer_pb2.Hyperparameters(world_size=world_size, nodes=nodes),
    )


def test_submit_refuses_more_workers_than_visible_gpus() -> None:
    validate_placement(_spec(world_size=2), gpu_count=2)
    validate_placement(_spec(world_size=8), gpu_count=0)  # CPU trainer: gloo workers
    with pytest.raises(InvalidArgument, match=r"world_size=4 needs 4 GPUs .* 2 are visible"):
        validate_placement(_spec(world_size=4), gpu_count=2)


def test_nodes_are_validated_and_mapped_from_yaml(tmp_path: Path) -> None:
    validate_spec(_spec(nodes=2, world_size=2))
    with pytest.raises(InvalidArgument, match="nodes is too large"):
        validate_spec(_spec(nodes=17))
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("adapter: bot\ndataset: d.jsonl\nworld_size: 2\nnodes: 3\n")
    hp = build_job_spec(load_spec_file(spec_file)).hyperparameters
    assert (hp.world_size, hp.nodes) == (2, 3)


def test_the_rendezvous_host_defaults_to_the_grpc_host() -> None:
    assert TrainerSettings(grpc_host="10.0.0.5").rendezvous_host() == "10.0.0.5"
    assert TrainerSettings(grpc_host="0.0.0.0").rendezvous_host() not in ("", "0.0.0.0")
    settings = TrainerSettings(grpc_host="0.0.0.0", advertise_host="trainer-1.svc")
    assert settings.rendezvous_host() == "trainer-1.svc"


# -- gang formation ------------------------------------------------------------------------


async def _leader(nodes: int, timeout_s: float) -> tuple[Leader, list[trainer_pb2.GangSlot]]:
    settings = TrainerSettings(
        grpc_host="127.0.0.1", gang_timeout_s=timeout_s, job_queue="q", instance_id="n0"
    )
    job = trainer_pb2.Job(
        job_id="job_1",
        attempts=2,
        spec=trainer_pb2.JobSpec(hyperparameters=trainer_pb2.Hyperparameters(nodes=nodes)),
    )
    published: list[tuple[str, Message]] = []

    async def publish(subject: str, event: Message) -> None:
        published.append((subject, event))

    leader = await Leader.open(settings, job, publish)
    assert {subject for subject, _ in published} == {gang_subject("q")}
    slots = [e for _, e in published if isinstance(e, trainer_pb2.GangSlot)]
    return leader, slots


async def test_each_member_slot_is_claimed_once_and_the_gang_starts_when_all_are_ready() -> None:
    leader, slots = await _leader(nodes=3, timeout_s=10)
    try:
        assert [(s.node_rank, s.nodes, s.attempt) for s in slots] == [(1, 3, 2), (2, 3, 2)]
        assert len({s.meta.event_id for s in slots}) == 2  # one stored copy per slot
        assert not slot_expired(slots[0])
        one = await asyncio.to_thread(Member.join, slots[0], "replica-a")
        assert one is not None
        # A redelivered copy of the same slot: another replica cannot take the rank too.
        assert await asyncio.to_thread(Member.join, slots[0], "replica-b") is None
        two = await asyncio.to_thread(Member.join, slots[1], "replica-b")
        assert two is not None
        for member in (one, two):
            await asyncio.to_thread(member.ready)
        await leader.wait_members(threading.Event())
        assert await asyncio.to_thread(one.wait_go, 5, threading.Event())
        assert (one.node(30).node_rank, one.node(30).nodes) == (1, 3)
        assert leader.node().store_port == slots[0].store_port
    finally:
        leader.close()


async def test_a_gang_that_does_not_form_in_time_fails_and_releases_its_members() -> None:
    leader, slots = await _leader(nodes=3, timeout_s=0.5)
    try:
        member = await asyncio.to_thread(Member.join, slots[0], "replica-a")
        assert member is not None
        await asyncio.to_thread(member.ready)
        with pytest.raises(GangFailed, match=r"1 of 2 member node\(s\) joined .* queue 'q'"):
            await leader.wait_members(threading.Event())
        assert not await asyncio.to_thread(member.wait_go, 5, threading.Event())
        # Late arrivals see the abort and stay out.
        assert await asyncio.to_thread(Member.join, slots[1], "replica-b") is None
    finally:
        leader.close()


async def test_a_member_that_cannot_prepare_fails_the_gang_with_its_reason() -> None:
    leader, slots = await _leader(nodes=2, timeout_s=10)
    try:
        member = await asyncio.to_thread(Member.join, slots[0], "replica-a")
        assert member is not None
        await asyncio.to_thread(member.fail, "base model not readable")
        with pytest.raises(GangFailed, match=r"node 1 \(replica-a\): base model not readable"):
            await leader.wait_members(threading.Event())
    finally:
        leader.close()


async def test_a_slot_whose_leader_is_gone_is_stale() -> None:
    leader, slots = await _leader(nodes=2, timeout_s=10)
    leader.close()
    slot = trainer_pb2.GangSlot()
    slot.CopyFrom(slots[0])
    slot.store_port = 1  # nothing listens there
    assert await asyncio.to_thread(Member.join, slot, "replica-a", 1.0) is None
