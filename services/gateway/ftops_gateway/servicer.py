"""The GatewayService gRPC surface: thin, delegating to Gateway and ReleaseManager."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops_gateway.gateway import Gateway
from ftops_gateway.releases import ReleaseManager


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, gateway: Gateway, releases: ReleaseManager) -> None:
        self._gateway = gateway
        self._releases = releases

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: Any
    ) -> gateway_pb2.GenerateResponse:
        return await self._gateway.generate(request)

    async def GenerateStream(
        self, request: gateway_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        async for chunk in self._gateway.generate_stream(request):
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
