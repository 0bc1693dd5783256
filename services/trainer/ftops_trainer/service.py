"""gRPC servicer: checks the caller against the job's team, then translates requests to
JobManager calls and nothing else."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_runtime import auth
from ftops_runtime.auth import Role
from ftops_runtime.errors import InvalidArgument
from ftops_trainer.jobs import JobManager

SERVICE_NAME = "ftops.trainer.v1.TrainerService"
log = logging.getLogger(__name__)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs

    async def _job(self, job_id: str, role: Role, action: str) -> trainer_pb2.Job:
        job = await self._jobs.get(job_id)
        auth.require(job.spec.team, role, action=f"{action} of job {job_id}")
        return job

    async def SubmitJob(
        self, request: trainer_pb2.SubmitJobRequest, context: Any
    ) -> trainer_pb2.Job:
        if not request.spec.team and not auth.current().platform_admin:
            raise InvalidArgument("spec.team is required: the team the job trains for")
        auth.require(request.spec.team, Role.trainer, action="SubmitJob")
        return await self._jobs.submit(request.spec, request.idempotency_key)

    async def GetJob(self, request: trainer_pb2.GetJobRequest, context: Any) -> trainer_pb2.Job:
        return await self._job(request.job_id, Role.viewer, "GetJob")

    async def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: Any
    ) -> trainer_pb2.ListJobsResponse:
        caller = auth.current()
        team = request.team
        if team:
            auth.require(team, Role.viewer, action="ListJobs")
        elif not caller.platform_admin:
            teams = caller.teams(Role.viewer)
            if len(teams) == 1:  # the common case: list that team's jobs, paging intact
                (team,) = teams
        listed = await self._jobs.list(request.adapter, team, request.page_size, request.page_token)
        if caller.platform_admin or team:
            return listed
        # A key in several teams: its teams' jobs only (a page may come back short; the
        # page token still leads on).
        visible = [j for j in listed.jobs if caller.can(j.spec.team, Role.viewer)]
        return trainer_pb2.ListJobsResponse(jobs=visible, next_page_token=listed.next_page_token)

    async def WatchJob(
        self, request: trainer_pb2.GetJobRequest, context: Any
    ) -> AsyncIterator[trainer_pb2.Job]:
        await self._job(request.job_id, Role.viewer, "WatchJob")
        async for job in self._jobs.watch(request.job_id):
            yield job

    async def CancelJob(
        self, request: trainer_pb2.CancelJobRequest, context: Any
    ) -> trainer_pb2.Job:
        await self._job(request.job_id, Role.trainer, "CancelJob")
        return await self._jobs.cancel(request.job_id)
