"""The GatewayService gRPC surface: thin, delegating to Gateway and ReleaseManager after
checking the caller against the alias's team (Generate's checks live in GuardedGateway,
shared with the OpenAI HTTP front end)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops_gateway.alias_access import AliasAccess
from ftops_gateway.chooser import Caller
from ftops_gateway.forwarder import caller_deadline
from ftops_gateway.gateway import Gateway
from ftops_gateway.releases import ReleaseManager
from ftops_runtime.auth import Role
from ftops_runtime.errors import FtopsError, PermissionDenied, retry_after_metadata

USER_HEADER = "x-ftops-user"
TENANT_HEADER = "x-ftops-tenant"
META_HEADER_PREFIX = "x-ftops-meta-"


def caller_from(request: gateway_pb2.GenerateRequest, context: Any) -> Caller:
    """Request fields first; gRPC metadata headers fill what they leave empty."""
    headers: dict[str, str] = {}
    metadata = context.invocation_metadata() if context is not None else None
    for key, value in metadata or ():
        if isinstance(value, str):
            headers[key.lower()] = value
    merged = {
        key.removeprefix(META_HEADER_PREFIX): value
        for key, value in headers.items()
        if key.startswith(META_HEADER_PREFIX)
    }
    merged.update(request.metadata)
    return Caller(
        tenant=request.tenant or headers.get(TENANT_HEADER, ""),
        user=request.user or headers.get(USER_HEADER, ""),
        metadata=merged,
    )


def _advise_retry(context: Any, exc: BaseException) -> None:
    """A refusal's retry advice (the rate limit's, a replica's) as the call's trailing
    metadata, ``retry-after-ms``; the error interceptor aborts the call and keeps it."""
    advice = retry_after_metadata(exc)
    if advice and context is not None:
        context.set_trailing_metadata(advice)


def _take_deadline(context: Any) -> None:
    """The client's gRPC deadline, for forwarding (this request's context only)."""
    left = context.time_remaining()
    if left is not None:
        caller_deadline.set(time.monotonic() + left)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, gateway: Gateway, releases: ReleaseManager, access: AliasAccess) -> None:
        self._gateway = gateway
        self._releases = releases
        self._access = access

    async def _release_command(self, action: str, alias: str) -> None:
        await self._access.require_alias(alias, Role.releaser, action)

    async def _viewable(self, action: str, release: gateway_pb2.Release) -> gateway_pb2.Release:
        if not await self._access.may_view(release.route):
            raise PermissionDenied(
                f"{action}: release {release.route.release_id or '?'} of alias "
                f"{release.route.alias!r} belongs to a team your key has no role in"
            )
        return release

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: Any
    ) -> gateway_pb2.GenerateResponse:
        caller = caller_from(request, context)
        if caller.tenant and not request.tenant:
            request.tenant = caller.tenant  # reported with the result
        _take_deadline(context)
        try:
            return await self._gateway.generate(request, caller)
        except (FtopsError, grpc.aio.AioRpcError) as exc:
            _advise_retry(context, exc)
            raise

    async def GenerateStream(
        self, request: gateway_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        caller = caller_from(request, context)
        if caller.tenant and not request.tenant:
            request.tenant = caller.tenant
        _take_deadline(context)
        try:
            async for chunk in self._gateway.generate_stream(request, caller):
                yield chunk
        except (FtopsError, grpc.aio.AioRpcError) as exc:
            _advise_retry(context, exc)
            raise

    async def SetRoute(
        self, request: gateway_pb2.SetRouteRequest, context: Any
    ) -> gateway_pb2.Route:
        # Both the alias's current team and the new version's: no taking over another
        # team's alias, no routing one's own alias to another team's version.
        await self._release_command("SetRoute", request.alias)
        if request.version_id:
            await self._access.require_version(request.version_id, Role.releaser, "SetRoute")
        return await self._releases.set_route(request.alias, request.version_id)

    async def GetRoute(
        self, request: gateway_pb2.GetRouteRequest, context: Any
    ) -> gateway_pb2.Route:
        await self._access.require_alias(request.alias, Role.viewer, "GetRoute")
        return await self._releases.get_route(request.alias)

    async def StartRelease(
        self, request: gateway_pb2.StartReleaseRequest, context: Any
    ) -> gateway_pb2.Route:
        await self._release_command("StartRelease", request.alias)
        if request.candidate_version_id:
            await self._access.require_version(
                request.candidate_version_id, Role.releaser, "StartRelease"
            )
            await self._access.require_same_team(request.alias, request.candidate_version_id)
        return await self._releases.start_release(request)

    async def GetRelease(
        self, request: gateway_pb2.GetReleaseRequest, context: Any
    ) -> gateway_pb2.Release:
        if request.alias:
            await self._access.require_alias(request.alias, Role.viewer, "GetRelease")
        return await self._viewable("GetRelease", await self._releases.get_release(request))

    async def ListReleases(
        self, request: gateway_pb2.ListReleasesRequest, context: Any
    ) -> gateway_pb2.ListReleasesResponse:
        if request.alias:
            await self._access.require_alias(request.alias, Role.viewer, "ListReleases")
            return await self._releases.list_releases(request)
        listed = await self._releases.list_releases(request)
        visible = [r for r in listed.releases if await self._access.may_view(r.route)]
        del listed.releases[:]
        listed.releases.extend(visible)
        return listed

    async def PauseRelease(
        self, request: gateway_pb2.ReleaseCommandRequest, context: Any
    ) -> gateway_pb2.Release:
        await self._release_command("PauseRelease", request.alias)
        return await self._releases.pause(request)

    async def ResumeRelease(
        self, request: gateway_pb2.ReleaseCommandRequest, context: Any
    ) -> gateway_pb2.Release:
        await self._release_command("ResumeRelease", request.alias)
        return await self._releases.resume(request)

    async def PromoteRelease(
        self, request: gateway_pb2.ReleaseCommandRequest, context: Any
    ) -> gateway_pb2.Release:
        await self._release_command("PromoteRelease", request.alias)
        return await self._releases.promote(request)

    async def RollbackRelease(
        self, request: gateway_pb2.ReleaseCommandRequest, context: Any
    ) -> gateway_pb2.Release:
        await self._release_command("RollbackRelease", request.alias)
        return await self._releases.rollback(request)

    async def WatchRelease(
        self, request: gateway_pb2.WatchReleaseRequest, context: Any
    ) -> AsyncIterator[gateway_pb2.Release]:
        await self._access.require_alias(request.alias, Role.viewer, "WatchRelease")
        async for release in self._releases.watch(request.alias):
            yield release
