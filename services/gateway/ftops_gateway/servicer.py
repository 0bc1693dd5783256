"""The GatewayService gRPC surface: thin, delegating to Gateway and ReleaseManager."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops_gateway.chooser import Caller
from ftops_gateway.gateway import Gateway
from ftops_gateway.releases import ReleaseManager

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


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, gateway: Gateway, releases: ReleaseManager) -> None:
        self._gateway = gateway
        self._releases = releases

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: Any
    ) -> gateway_pb2.GenerateResponse:
        caller = caller_from(request, context)
        if caller.tenant and not request.tenant:
            request.tenant = caller.tenant  # reported with the result
        return await self._gateway.generate(request, caller)

    async def GenerateStream(
        self, request: gateway_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        caller = caller_from(request, context)
        if caller.tenant and not request.tenant:
            request.tenant = caller.tenant
        async for chunk in self._gateway.generate_stream(request, caller):
            yield chunk

    async def SetRoute(
        self, request: gateway_pb2.SetRouteRequest, context: Any
    ) -> gateway_pb2.Route:
        return await self._releases.set_route(request.alias, request.version_id)

    async def GetRoute(
        self, request: gateway_pb2.GetRouteRequest, context: Any
    ) -> gateway_pb2.Route:
        return await self._releases.get_route(request.alias)

    async def StartRelease(
        self, request: gateway_pb2.StartReleaseRequest, context: Any
    ) -> gateway_pb2.Route:
        return await self._releases.start_release(request)

    async def GetRelease(
        self, request: gateway_pb2.GetReleaseRequest, context: Any
    ) -> gateway_pb2.Release:
        return await self._releases.get_release(request)

    async def ListReleases(
        self, request: gateway_pb2.ListReleasesRequest, context: Any
    ) -> gateway_pb2.ListReleasesResponse:
        return await self._releases.list_releases(request)

    async def PauseRelease(
        self, request: gateway_pb2.ReleaseCommandRequest, context: Any
    ) -> gateway_pb2.Release:
        return await self._releases.pause(request)

    async def ResumeRelease(
        self, request: gateway_pb2.ReleaseCommandRequest, context: Any
    ) -> gateway_pb2.Release:
        return await self._releases.resume(request)

    async def PromoteRelease(
        self, request: gateway_pb2.ReleaseCommandRequest, context: Any
    ) -> gateway_pb2.Release:
        return await self._releases.promote(request)

    async def RollbackRelease(
        self, request: gateway_pb2.ReleaseCommandRequest, context: Any
    ) -> gateway_pb2.Release:
        return await self._releases.rollback(request)

    async def WatchRelease(
        self, request: gateway_pb2.WatchReleaseRequest, context: Any
    ) -> AsyncIterator[gateway_pb2.Release]:
        async for release in self._releases.watch(request.alias):
            yield release
