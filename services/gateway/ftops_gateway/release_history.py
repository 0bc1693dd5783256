"""The registry's release history (it records every release.* event), read best-effort:
the live state is in Redis, so a registry outage only leaves the history out."""

from __future__ import annotations

import logging

import grpc

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

# The registry stores strategies by lower-case enum name ("blue_green").
_STRATEGIES = {
    name.removeprefix("RELEASE_STRATEGY_").lower(): value
    for name, value in events_pb2.ReleaseStrategy.items()
}


class ReleaseHistory:
    def __init__(self, stub: registry_pb2_grpc.RegistryServiceStub, *, timeout_s: float = 5.0):
        self._stub = stub
        self._timeout_s = timeout_s

    async def get(self, release_id: str) -> registry_pb2.Release | None:
        """The registry's record of a release; None when unknown or unreachable."""
        try:
            release: registry_pb2.Release = await self._stub.GetRelease(
                registry_pb2.GetReleaseRequest(release_id=release_id), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("release history of %s unavailable: %s", release_id, exc.details())
            return None
        return release

    async def list(self, alias: str, limit: int) -> list[registry_pb2.Release]:
        try:
            response = await self._stub.ListReleases(
                registry_pb2.ListReleasesRequest(alias=alias, page_size=limit),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("release history of %s unavailable: %s", alias, exc.details())
            return []
        return list(response.releases)


def from_record(record: registry_pb2.Release) -> gateway_pb2.Release:
    """A finished release known only to the registry, in the gateway's shape."""
    route = gateway_pb2.Route(
        alias=record.alias,
        release_id=record.release_id,
        steps=record.steps,
        release_stable_version_id=record.stable_version_id,
        release_candidate_version_id=record.candidate_version_id,
        strategy=_STRATEGIES.get(record.strategy, events_pb2.RELEASE_STRATEGY_UNSPECIFIED),
        release_state=record.state,
    )
    route.started_at.CopyFrom(record.started_at)
    route.updated_at.CopyFrom(record.updated_at)
    if record.history:
        route.last_decision.CopyFrom(record.history[-1])
    return gateway_pb2.Release(route=route, state=record.state, history=record.history)
