"""``FtopsClient``: one async object over the four public services.

    async with FtopsClient() as ftops:            # endpoints from FTOPS_*_ADDRESS or dev ports
        job = await ftops.submit_job(spec)
        async for update in ftops.watch_job(job.job_id):
            ...

Every method returns the service's proto message; every gRPC failure is raised as
:class:`~ftops_client.errors.FtopsClientError`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TypeVar

import grpc

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_client.errors import FtopsClientError
from ftops_client.tls import client_tls
from ftops_runtime.client import channel
from ftops_runtime.tls import ClientTls

T = TypeVar("T")

# The ports `ftops up` prefers (ftops_devstack.stack).
DEFAULT_ADDRESSES = {
    "gateway": "127.0.0.1:50055",
    "trainer": "127.0.0.1:50053",
    "registry": "127.0.0.1:50051",
    "monitor": "127.0.0.1:50054",
}


@dataclass(frozen=True)
class Endpoints:
    gateway: str = DEFAULT_ADDRESSES["gateway"]
    trainer: str = DEFAULT_ADDRESSES["trainer"]
    registry: str = DEFAULT_ADDRESSES["registry"]
    monitor: str = DEFAULT_ADDRESSES["monitor"]

    @classmethod
    def from_env(
        cls,
        *,
        gateway: str | None = None,
        trainer: str | None = None,
        registry: str | None = None,
        monitor: str | None = None,
    ) -> Endpoints:
        """Explicit values first, then ``FTOPS_<SERVICE>_ADDRESS``, then the dev ports."""

        def pick(name: str, given: str | None) -> str:
            return (
                given or os.environ.get(f"FTOPS_{name.upper()}_ADDRESS") or DEFAULT_ADDRESSES[name]
            )

        return cls(
            gateway=pick("gateway", gateway),
            trainer=pick("trainer", trainer),
            registry=pick("registry", registry),
            monitor=pick("monitor", monitor),
        )


@dataclass(frozen=True)
class ReleaseStatus:
    """The gateway's route for an alias and the monitor's analysis of its release."""

    route: gateway_pb2.Route
    analysis: monitor_pb2.ReleaseAnalysis


class FtopsClient:
    def __init__(
        self,
        endpoints: Endpoints | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        tls: ClientTls | None = None,
    ) -> None:
        """``api_key`` and ``tls`` left out: from the environment (``FTOPS_API_KEY``,
        ``FTOPS_TLS_*``: ftops_client.tls)."""
        self.endpoints = endpoints or Endpoints.from_env()
        self.api_key = os.environ.get("FTOPS_API_KEY", "") if api_key is None else api_key
        self.tls = client_tls() if tls is None else tls
        self.timeout = timeout
        self._channels: list[grpc.aio.Channel] = []
        ep = self.endpoints
        self._gateway = gateway_pb2_grpc.GatewayServiceStub(self._open(ep.gateway))
        self._trainer = trainer_pb2_grpc.TrainerServiceStub(self._open(ep.trainer))
        self._registry = registry_pb2_grpc.RegistryServiceStub(self._open(ep.registry))
        self._monitor = monitor_pb2_grpc.MonitorServiceStub(self._open(ep.monitor))

    def _open(self, address: str) -> grpc.aio.Channel:
        ch = channel(address, api_key=self.api_key, tls=self.tls)
        self._channels.append(ch)
        return ch

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    async def __aenter__(self) -> FtopsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, service: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise FtopsClientError.from_rpc(exc, service, getattr(self.endpoints, service)) from exc

    async def _stream(self, service: str, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        try:
            async for item in stream:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise FtopsClientError.from_rpc(exc, service, getattr(self.endpoints, service)) from exc

    # trainer

    async def submit_job(
        self, spec: trainer_pb2.JobSpec, *, idempotency_key: str = ""
    ) -> trainer_pb2.Job:
        request = trainer_pb2.SubmitJobRequest(spec=spec, idempotency_key=idempotency_key)
        return await self._call("trainer", self._trainer.SubmitJob(request, timeout=self.timeout))

    async def get_job(self, job_id: str) -> trainer_pb2.Job:
        request = trainer_pb2.GetJobRequest(job_id=job_id)
        return await self._call("trainer", self._trainer.GetJob(request, timeout=self.timeout))

    async def list_jobs(
        self, adapter: str = "", *, page_size: int = 0, page_token: str = ""
    ) -> trainer_pb2.ListJobsResponse:
        request = trainer_pb2.ListJobsRequest(
            adapter=adapter, page_size=page_size, page_token=page_token
        )
        return await self._call("trainer", self._trainer.ListJobs(request, timeout=self.timeout))

    async def cancel_job(self, job_id: str) -> trainer_pb2.Job:
        request = trainer_pb2.CancelJobRequest(job_id=job_id)
        return await self._call("trainer", self._trainer.CancelJob(request, timeout=self.timeout))

    def watch_job(self, job_id: str) -> AsyncIterator[trainer_pb2.Job]:
        """The job's state until it ends, the current state first."""
        stream = self._trainer.WatchJob(trainer_pb2.GetJobRequest(job_id=job_id))
        return self._stream("trainer", stream)

    # registry

    async def list_versions(
        self, adapter: str, *, page_size: int = 0, page_token: str = ""
    ) -> registry_pb2.ListVersionsResponse:
        request = registry_pb2.ListVersionsRequest(
            adapter=adapter, page_size=page_size, page_token=page_token
        )
        return await self._call(
            "registry", self._registry.ListVersions(request, timeout=self.timeout)
        )

    async def get_version(self, ref: str) -> registry_pb2.Version:
        """``ref``: a version id or ``adapter:number``."""
        request = (
            registry_pb2.GetVersionRequest(name=ref)
            if ":" in ref
            else registry_pb2.GetVersionRequest(version_id=ref)
        )
        return await self._call(
            "registry", self._registry.GetVersion(request, timeout=self.timeout)
        )

    async def lineage(self, version_id: str) -> registry_pb2.GetLineageResponse:
        request = registry_pb2.GetLineageRequest(version_id=version_id)
        return await self._call(
            "registry", self._registry.GetLineage(request, timeout=self.timeout)
        )

    async def list_releases(
        self, alias: str, *, page_size: int = 0, page_token: str = ""
    ) -> registry_pb2.ListReleasesResponse:
        request = registry_pb2.ListReleasesRequest(
            alias=alias, page_size=page_size, page_token=page_token
        )
        return await self._call(
            "registry", self._registry.ListReleases(request, timeout=self.timeout)
        )

    # registry: teams and API keys (docs/security.md)

    async def create_team(self, name: str, description: str = "") -> registry_pb2.Team:
        request = registry_pb2.CreateTeamRequest(name=name, description=description)
        return await self._call(
            "registry", self._registry.CreateTeam(request, timeout=self.timeout)
        )

    async def list_teams(self) -> registry_pb2.ListTeamsResponse:
        request = registry_pb2.ListTeamsRequest()
        return await self._call("registry", self._registry.ListTeams(request, timeout=self.timeout))

    async def create_api_key(
        self,
        name: str,
        roles: Sequence[tuple[str, registry_pb2.Role.ValueType]],
        *,
        platform_admin: bool = False,
        expires_at: datetime | None = None,
    ) -> registry_pb2.CreateApiKeyResponse:
        """``roles``: (team, ``registry_pb2.ROLE_*``) pairs. The response's ``secret`` is
        the full key, shown this once."""
        request = registry_pb2.CreateApiKeyRequest(
            name=name,
            roles=[registry_pb2.TeamRole(team=t, role=r) for t, r in roles],
            platform_admin=platform_admin,
        )
        if expires_at is not None:
            request.expires_at.FromDatetime(expires_at)
        return await self._call(
            "registry", self._registry.CreateApiKey(request, timeout=self.timeout)
        )

    async def list_api_keys(
        self, team: str = "", *, include_revoked: bool = False
    ) -> registry_pb2.ListApiKeysResponse:
        request = registry_pb2.ListApiKeysRequest(team=team, include_revoked=include_revoked)
        return await self._call(
            "registry", self._registry.ListApiKeys(request, timeout=self.timeout)
        )

    async def revoke_api_key(self, key_id: str) -> registry_pb2.ApiKey:
        request = registry_pb2.RevokeApiKeyRequest(key_id=key_id)
        return await self._call(
            "registry", self._registry.RevokeApiKey(request, timeout=self.timeout)
        )

    # gateway

    async def set_route(self, alias: str, version_id: str) -> gateway_pb2.Route:
        request = gateway_pb2.SetRouteRequest(alias=alias, version_id=version_id)
        return await self._call("gateway", self._gateway.SetRoute(request, timeout=self.timeout))

    async def get_route(self, alias: str) -> gateway_pb2.Route:
        request = gateway_pb2.GetRouteRequest(alias=alias)
        return await self._call("gateway", self._gateway.GetRoute(request, timeout=self.timeout))

    async def start_release(
        self,
        alias: str,
        candidate: str,
        *,
        strategy: events_pb2.ReleaseStrategy.ValueType = events_pb2.RELEASE_STRATEGY_CANARY,
        steps: Sequence[int] = (),
        min_requests: int = 0,
        max_error_rate: float = 0.0,
        max_latency_ratio: float = 0.0,
        auto: bool = True,
        analysis: events_pb2.AnalysisSettings | None = None,
        flags: Sequence[events_pb2.FlagRule] = (),
        shadow_percent: int | None = None,
        sticky: bool = False,
        hold_seconds: float | None = None,
        evidence_mirror_percent: int | None = None,
    ) -> gateway_pb2.Route:
        """A release of ``candidate`` on ``alias``; empty steps and zero thresholds take the
        server's defaults. ``auto=False`` leaves every promotion to :meth:`promote_release`.
        ``analysis`` replaces the individual threshold arguments when given.
        ``evidence_mirror_percent`` (canary; None = the gateway's default, 0 = off): the
        share of traffic the candidate is judged on while a step's weight is below it."""
        settings = analysis or events_pb2.AnalysisSettings(
            min_requests=min_requests,
            max_error_rate=max_error_rate,
            max_latency_ratio=max_latency_ratio,
            auto=auto,
        )
        request = gateway_pb2.StartReleaseRequest(
            alias=alias,
            candidate_version_id=candidate,
            strategy=strategy,
            steps=list(steps),
            analysis=settings,
            flags=list(flags),
            sticky=sticky,
        )
        if shadow_percent is not None:
            request.shadow_percent = shadow_percent
        if hold_seconds is not None:
            request.hold_seconds = hold_seconds
        if evidence_mirror_percent is not None:
            request.evidence_mirror_percent = evidence_mirror_percent
        return await self._call(
            "gateway", self._gateway.StartRelease(request, timeout=self.timeout)
        )

    async def get_release(self, alias: str = "", release_id: str = "") -> gateway_pb2.Release:
        """The alias's active or latest release, or one release by id (any alias)."""
        request = gateway_pb2.GetReleaseRequest(alias=alias, release_id=release_id)
        return await self._call("gateway", self._gateway.GetRelease(request, timeout=self.timeout))

    async def gateway_releases(
        self, alias: str = "", *, active_only: bool = False, limit: int = 0
    ) -> gateway_pb2.ListReleasesResponse:
        """Active releases of every alias; with ``alias``, its history from the registry too."""
        request = gateway_pb2.ListReleasesRequest(alias=alias, active_only=active_only, limit=limit)
        return await self._call(
            "gateway", self._gateway.ListReleases(request, timeout=self.timeout)
        )

    async def pause_release(
        self, alias: str, reason: str = "", *, release_id: str = ""
    ) -> gateway_pb2.Release:
        request = gateway_pb2.ReleaseCommandRequest(
            alias=alias, reason=reason, release_id=release_id
        )
        return await self._call(
            "gateway", self._gateway.PauseRelease(request, timeout=self.timeout)
        )

    async def resume_release(
        self, alias: str, reason: str = "", *, release_id: str = ""
    ) -> gateway_pb2.Release:
        request = gateway_pb2.ReleaseCommandRequest(
            alias=alias, reason=reason, release_id=release_id
        )
        return await self._call(
            "gateway", self._gateway.ResumeRelease(request, timeout=self.timeout)
        )

    async def promote_release(
        self, alias: str, reason: str = "", *, release_id: str = "", one_step: bool = False
    ) -> gateway_pb2.Release:
        """The final promotion (all traffic to the candidate), or with ``one_step`` the
        next step only."""
        request = gateway_pb2.ReleaseCommandRequest(
            alias=alias, reason=reason, release_id=release_id, one_step=one_step
        )
        return await self._call(
            "gateway", self._gateway.PromoteRelease(request, timeout=self.timeout)
        )

    async def rollback_release(
        self,
        alias: str,
        reason: str = "",
        *,
        release_id: str = "",
        revert_promotion: bool = False,
    ) -> gateway_pb2.Release:
        """All traffic back to the stable version of the running release, or with
        ``revert_promotion`` back to the version the latest completed promotion replaced."""
        request = gateway_pb2.ReleaseCommandRequest(
            alias=alias, reason=reason, release_id=release_id, revert_promotion=revert_promotion
        )
        return await self._call(
            "gateway", self._gateway.RollbackRelease(request, timeout=self.timeout)
        )

    def watch_release(self, alias: str) -> AsyncIterator[gateway_pb2.Release]:
        """The release now and after every change; ends when the release has finished."""
        request = gateway_pb2.WatchReleaseRequest(alias=alias)
        return self._stream("gateway", self._gateway.WatchRelease(request))

    async def release_analysis(self, alias: str) -> monitor_pb2.ReleaseAnalysis:
        """The monitor's live figures for the alias (state "none" when it has none yet)."""
        request = monitor_pb2.GetReleaseAnalysisRequest(alias=alias)
        try:
            return await self._call(
                "monitor", self._monitor.GetReleaseAnalysis(request, timeout=self.timeout)
            )
        except FtopsClientError as exc:
            if exc.code_name != "NOT_FOUND":
                raise
            return monitor_pb2.ReleaseAnalysis(alias=alias, state="none")

    def _generate_request(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        stop: Sequence[str],
        tenant: str,
        user: str,
        metadata: Mapping[str, str] | None,
        request_id: str,
        messages: Sequence[tuple[str, str]],
    ) -> gateway_pb2.GenerateRequest:
        sampling = common_pb2.SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=list(stop),
        )
        if seed is not None:
            sampling.seed = seed
        return gateway_pb2.GenerateRequest(
            model=model,
            prompt=prompt,
            sampling=sampling,
            tenant=tenant,
            user=user,
            metadata=dict(metadata or {}),
            request_id=request_id,
            messages=[gateway_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        )

    async def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        tenant: str = "",
        user: str = "",
        metadata: Mapping[str, str] | None = None,
        request_id: str = "",
        timeout: float = 120.0,
        messages: Sequence[tuple[str, str]] = (),
    ) -> gateway_pb2.GenerateResponse:
        """One completion. ``model``: an alias, a version id, ``adapter:number`` or
        ``base``. ``user`` and ``metadata`` are what release flag rules and the sticky split
        match on; ``request_id`` (generated by the gateway when empty) is the id
        :meth:`submit_feedback` takes. ``messages``: ``(role, content)`` turns instead of
        the prompt (pass ``""``), rendered with the base model's chat template."""
        request = self._generate_request(
            model,
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            tenant=tenant,
            user=user,
            metadata=metadata,
            request_id=request_id,
            messages=messages,
        )
        return await self._call("gateway", self._gateway.Generate(request, timeout=timeout))

    def generate_stream(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        tenant: str = "",
        user: str = "",
        metadata: Mapping[str, str] | None = None,
        request_id: str = "",
        timeout: float = 120.0,
        messages: Sequence[tuple[str, str]] = (),
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        """Like :meth:`generate`, as the tokens come (every chunk names the request id,
        the version and the arm that answered)."""
        request = self._generate_request(
            model,
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            tenant=tenant,
            user=user,
            metadata=metadata,
            request_id=request_id,
            messages=messages,
        )
        return self._stream("gateway", self._gateway.GenerateStream(request, timeout=timeout))

    # monitor (+ gateway)

    async def release_status(self, alias: str) -> ReleaseStatus:
        route = await self.get_route(alias)
        return ReleaseStatus(route=route, analysis=await self.release_analysis(alias))

    async def get_version_stats(self, alias: str, version_id: str) -> monitor_pb2.VersionStats:
        """The monitor's figures for one version behind one alias."""
        request = monitor_pb2.GetVersionStatsRequest(alias=alias, version_id=version_id)
        return await self._call(
            "monitor", self._monitor.GetVersionStats(request, timeout=self.timeout)
        )

    async def version_stats(self, alias: str = "") -> monitor_pb2.ListVersionStatsResponse:
        """The monitor's sliding-window figures per version, of one alias or of all."""
        request = monitor_pb2.ListVersionStatsRequest(alias=alias)
        return await self._call(
            "monitor", self._monitor.ListVersionStats(request, timeout=self.timeout)
        )

    async def submit_feedback(
        self, request_id: str, score: float, comment: str = ""
    ) -> monitor_pb2.SubmitFeedbackResponse:
        """A user's score (0 bad .. 1 good) of the answer to ``request_id``; a second score
        for the same request replaces the first. NOT_FOUND until the monitor has seen the
        request's result (it arrives over NATS shortly after the answer)."""
        request = monitor_pb2.SubmitFeedbackRequest(
            request_id=request_id, score=score, comment=comment
        )
        return await self._call(
            "monitor", self._monitor.SubmitFeedback(request, timeout=self.timeout)
        )

    async def list_alerts(self, alias: str = "") -> monitor_pb2.ListAlertsResponse:
        """Alerts firing now, of one alias or of all."""
        request = monitor_pb2.ListAlertsRequest(alias=alias)
        return await self._call("monitor", self._monitor.ListAlerts(request, timeout=self.timeout))
