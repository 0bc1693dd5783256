"""gRPC servicer: translates requests to JobManager calls and nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_trainer.jobs import JobManager

SERVICE_NAME = "ftops.trainer.v1.TrainerService"


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs

    async def SubmitJob(
        self, request: trainer_pb2.SubmitJobRequest, context: Any
    ) -> trainer_pb2.Job:
        return await self._jobs.submit(request.spec, request.idempotency_key)

    async def GetJob(self, request: trainer_pb2.GetJobRequest, context: Any) -> trainer_pb2.Job:
        return await self._jobs.get(request.job_id)

    async def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: Any
    ) -> trainer_pb2.ListJobsResponse:
        return await self._jobs.list(
            request.adapter, request.team, request.page_size, request.page_token
        )

    async def WatchJob(
        self, request: trainer_pb2.GetJobRequest, context: Any
    ) -> AsyncIterator[trainer_pb2.Job]:
        async for job in self._jobs.watch(request.job_id):
            yield job

    async def CancelJob(
        self, request: trainer_pb2.CancelJobRequest, context: Any
    ) -> trainer_pb2.Job:
        return await self._jobs.cancel(request.job_id)
