"""Job records kept in the registry, so every trainer replica can answer for every job and
a job outlives the replica that ran it.

Writes are compare-and-set on the record's revision: a replica that lost a race (the job
was cancelled meanwhile, or another replica took it over) learns it from ABORTED instead
of silently overwriting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2
from ftops_runtime.errors import NotFound

REGISTRY_TIMEOUT_S = 30.0
JobState = events_pb2.JobState
TERMINAL = frozenset(
    {
        JobState.JOB_STATE_SUCCEEDED,
        JobState.JOB_STATE_FAILED,
        JobState.JOB_STATE_CANCELLED,
        JobState.JOB_STATE_REJECTED,
    }
)


class JobExists(Exception):
    """A record with that job id exists already (an idempotent resubmit)."""


class StaleJob(Exception):
    """The record changed since it was read."""


def is_terminal(job: trainer_pb2.Job) -> bool:
    return job.state in TERMINAL


class JobStore:
    def __init__(self, registry: registry_pb2_grpc.RegistryServiceAsyncStub) -> None:
        self._registry = registry

    async def create(self, job: trainer_pb2.Job) -> registry_pb2.JobRecord:
        try:
            record: registry_pb2.JobRecord = await self._registry.PutJob(
                registry_pb2.PutJobRequest(job=job, expected_revision=0),
                timeout=REGISTRY_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                raise JobExists(job.job_id) from exc
            raise
        return record

    async def get(self, job_id: str) -> registry_pb2.JobRecord:
        try:
            record: registry_pb2.JobRecord = await self._registry.GetJob(
                registry_pb2.GetJobRecordRequest(job_id=job_id), timeout=REGISTRY_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"job {job_id!r} not found") from exc
            raise
        return record

    async def put(self, job: trainer_pb2.Job, revision: int) -> registry_pb2.JobRecord:
        try:
            record: registry_pb2.JobRecord = await self._registry.PutJob(
                registry_pb2.PutJobRequest(job=job, expected_revision=revision),
                timeout=REGISTRY_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED:
                raise StaleJob(job.job_id) from exc
            raise
        return record

    async def update(
        self, job_id: str, change: Callable[[trainer_pb2.Job], bool], attempts: int = 5
    ) -> registry_pb2.JobRecord:
        """Read, apply ``change`` (which returns False to leave the record alone), write;
        re-read and retry when another writer got there first."""
        for _ in range(attempts):
            record = await self.get(job_id)
            job = trainer_pb2.Job()
            job.CopyFrom(record.job)
            if not change(job):
                return record
            job.updated_at.GetCurrentTime()
            try:
                return await self.put(job, record.revision)
            except StaleJob:
                continue
        raise StaleJob(f"job {job_id}: too many concurrent writers")

    async def list(
        self,
        adapter: str,
        team: str,
        page_size: int,
        page_token: str,
        *,
        states: Sequence[events_pb2.JobState.ValueType] = (),
    ) -> registry_pb2.ListJobRecordsResponse:
        reply: registry_pb2.ListJobRecordsResponse = await self._registry.ListJobs(
            registry_pb2.ListJobRecordsRequest(
                adapter=adapter,
                team=team,
                states=states,
                page_size=page_size,
                page_token=page_token,
            ),
            timeout=REGISTRY_TIMEOUT_S,
        )
        return reply
