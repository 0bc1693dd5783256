"""Multi-node jobs: a gang of trainer replicas trains one job together.

The replica that takes the job from the work queue is node 0. It starts a torch.distributed
TCPStore on a free port of its advertised host and publishes ``nodes - 1`` ``GangSlot``s
on the work-queue subject ``work.trainer.<queue>.gang``, so each slot is taken once, by an
idle replica of the queue. A member claims its node rank in the store (first claim wins,
so a redelivered slot cannot make two members of one rank), prepares the job's inputs
itself (the same seeded pipeline as node 0; the loop then checks every rank agrees) and
says it is ready. When every member is ready node 0 says go and every node spawns its
workers against the same store; the process group's collectives time out
(``distributed_timeout_s``), so a node that dies or hangs ends the run instead of
blocking it. A gang that has not formed by ``gang_timeout_s`` fails the job: recruiting
again and again while the pool is busy would only hide that the pool is too small.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import torch.distributed as dist
from google.protobuf.message import Message
from torch._C._distributed_c10d import TCPStore  # typed here, not re-exported

from ftops.trainer.v1 import trainer_pb2
from ftops_runtime import events
from ftops_trainer.distributed import NodeSpec
from ftops_trainer.settings import TrainerSettings
from ftops_trainer.training import TrainingStopped

log = logging.getLogger(__name__)

Publish = Callable[[str, Message], Awaitable[None]]
_POLL_S = 0.2
_CONNECT_TIMEOUT_S = 10.0
_ABORT, _GO = "abort", "go"


def gang_subject(queue: str) -> str:
    """Member slots of the queue's multi-node jobs (covered by the work-queue stream)."""
    return f"{events.trainer_job_queue(queue)}.gang"


class GangFailed(Exception):
    """The gang did not form (not enough idle replicas, or a member could not join)."""


def slot_expired(slot: trainer_pb2.GangSlot) -> bool:
    return slot.deadline.ToSeconds() <= time.time()


class Leader:
    """Node 0's side: the store every node's workers meet at, and the gang's formation."""

    def __init__(self, store: TCPStore, host: str, nodes: int, settings: TrainerSettings) -> None:
        self._store = store
        self._host = host
        self._nodes = nodes
        self._settings = settings
        self._deadline = time.monotonic() + settings.gang_timeout_s

    @classmethod
    async def open(
        cls, settings: TrainerSettings, job: trainer_pb2.Job, publish: Publish
    ) -> Leader:
        nodes = job.spec.hyperparameters.nodes
        host = settings.rendezvous_host()
        store = await asyncio.to_thread(
            TCPStore,
            host,
            0,  # a free port; the master listens on every interface
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=settings.distributed_timeout_s),
        )
        leader = cls(store, host, nodes, settings)
        try:
            for rank in range(1, nodes):
                slot = trainer_pb2.GangSlot(
                    meta=events.new_meta("trainer", settings.instance_id),
                    job_id=job.job_id,
                    attempt=job.attempts,
                    node_rank=rank,
                    nodes=nodes,
                    store_host=host,
                    store_port=store.port,
                    leader=settings.instance_id,
                )
                slot.deadline.FromSeconds(int(time.time() + settings.gang_timeout_s) + 1)
                # One stored copy per slot, should the publish be retried.
                slot.meta.event_id = events.derived_event_id("gang", job.job_id, job.attempts, rank)
                await publish(gang_subject(settings.job_queue), slot)
        except BaseException:
            leader.close()
            raise
        log.info(
            "job %s recruits %d member node(s); rendezvous at %s:%d",
            job.job_id,
            nodes - 1,
            host,
            store.port,
        )
        return leader

    def node(self) -> NodeSpec:
        return NodeSpec(
            nodes=self._nodes,
            node_rank=0,
            store_host=self._host,
            store_port=self._store.port,
            timeout_s=self._settings.distributed_timeout_s,
        )

    def _poll(self) -> tuple[str | None, int]:
        if self._store.check([_ABORT]):
            return self._store.get(_ABORT).decode(), 0
        ready = sum(self._store.check([f"ready/{r}"]) for r in range(1, self._nodes))
        return None, ready

    async def wait_members(self, stop: threading.Event) -> None:
        """Until every member is ready (then go), a member's failure, a stop or the
        deadline (then abort: members waiting for go give up)."""
        members = self._nodes - 1
        while True:
            problem, ready = await asyncio.to_thread(self._poll)
            if problem is not None:
                raise GangFailed(f"a member node could not join: {problem}")
            if ready == members:
                await asyncio.to_thread(self._store.set, _GO, "1")
                return
            if stop.is_set():
                await asyncio.to_thread(self._store.set, _ABORT, "the job was stopped")
                raise TrainingStopped("stopped while its gang formed")
            if time.monotonic() >= self._deadline:
                await asyncio.to_thread(self._store.set, _ABORT, "the gang did not form in time")
                raise GangFailed(
                    f"the job's gang did not form within {self._settings.gang_timeout_s:g} s: "
                    f"{ready} of {members} member node(s) joined (a {self._nodes}-node job "
                    f"needs {members} idle trainer replica(s) on queue "
                    f"{self._settings.job_queue!r} besides this one)"
                )
            await asyncio.sleep(_POLL_S)

    def close(self) -> None:
        # The store's server stops with its last reference; workers are gone by now.
        del self._store


class Member:
    """A member node's side: its claimed rank, readiness, and waiting for go. Blocking:
    call from a worker thread."""

    def __init__(self, store: TCPStore, slot: trainer_pb2.GangSlot, instance: str) -> None:
        self._store = store
        self.slot = slot
        self._instance = instance

    @classmethod
    def join(
        cls,
        slot: trainer_pb2.GangSlot,
        instance: str,
        connect_timeout_s: float = _CONNECT_TIMEOUT_S,
    ) -> Member | None:
        """Claim the slot's rank; None when it is stale (node 0 gone, the rank taken by
        another replica, or the gang already aborted)."""
        try:
            store = TCPStore(
                slot.store_host,
                slot.store_port,
                is_master=False,
                timeout=timedelta(seconds=connect_timeout_s),
            )
            claim = store.compare_set(f"claim/{slot.node_rank}", "", instance)
            if claim != instance.encode() or store.check([_ABORT]):
                return None
        except (dist.DistError, RuntimeError) as exc:
            log.info("gang slot %s of job %s is stale: %s", slot.node_rank, slot.job_id, exc)
            return None
        return cls(store, slot, instance)

    def ready(self) -> None:
        self._store.set(f"ready/{self.slot.node_rank}", self._instance)

    def fail(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            self._store.set(_ABORT, f"node {self.slot.node_rank} ({self._instance}): {reason}")

    def wait_go(self, timeout_s: float, stop: threading.Event) -> bool:
        """True once node 0 says go; False when it aborts, the wait times out or we stop."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not stop.is_set():
            if self._store.check([_GO]):
                return True
            if self._store.check([_ABORT]):
                return False
            time.sleep(_POLL_S)
        return False

    def node(self, timeout_s: float) -> NodeSpec:
        return NodeSpec(
            nodes=self.slot.nodes,
            node_rank=self.slot.node_rank,
            store_host=self.slot.store_host,
            store_port=self.slot.store_port,
            timeout_s=timeout_s,
        )
