"""Which team an alias or a version belongs to, and the checks built on it.

An alias belongs to the team of the adapter its stable version is a version of (a
candidate must be of the same team to be released on it). Both lookups are cached: the
route table is this replica's copy, and versions are immutable, so the registry is asked
once per version (with the gateway's own service key).

``GuardedGateway`` puts the request-path checks (the caller's teams must own what it
calls, then the caller's rate limit) in front of both front ends, gRPC and OpenAI HTTP."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ftops.gateway.v1 import gateway_pb2
from ftops_gateway.chooser import Caller
from ftops_gateway.gateway import BASE_MODEL, Gateway
from ftops_gateway.rate_limit import RateLimiter
from ftops_gateway.route_cache import RouteCache
from ftops_gateway.versions import VersionResolver
from ftops_runtime import auth
from ftops_runtime.auth import AuthPrincipal, Role
from ftops_runtime.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)


class AliasAccess:
    """``enforce=False`` (auth off) lets every caller through, whatever hook resolved it."""

    def __init__(
        self, routes: RouteCache, versions: VersionResolver, *, enforce: bool = True
    ) -> None:
        self._routes = routes
        self._versions = versions
        self._enforce = enforce

    def _unchecked(self, caller: AuthPrincipal) -> bool:
        return not self._enforce or caller.platform_admin

    async def version_team(self, ref: str) -> str:
        return str((await self._versions.get(ref)).team)

    async def alias_team(self, alias: str) -> str | None:
        """The alias's team, or None when it routes nowhere yet (nobody owns it)."""
        route = await self._routes.lookup(alias) if alias else None
        if route is None or not route.stable_version_id:
            return None
        return await self.version_team(route.stable_version_id)

    async def require_alias(self, alias: str, role: Role, action: str) -> AuthPrincipal:
        """PERMISSION_DENIED unless the caller holds ``role`` in the alias's team. An
        alias without a route passes: the command itself answers NOT_FOUND."""
        caller = auth.current()
        if self._unchecked(caller):  # no lookups with auth off
            return caller
        team = await self.alias_team(alias)
        if team is None:
            return caller
        return auth.require(team, role, action=f"{action} on alias {alias!r}")

    async def require_version(self, ref: str, role: Role, action: str) -> AuthPrincipal:
        caller = auth.current()
        if self._unchecked(caller):
            return caller
        team = await self.version_team(ref)
        return auth.require(team, role, action=f"{action} of version {ref!r}")

    async def require_same_team(self, alias: str, version_ref: str) -> None:
        """A release stays within one team: its candidate must be of the alias's team (else
        the alias's callers would reach another team's model)."""
        alias_team = await self.alias_team(alias)
        if alias_team is None:
            return
        version_team = await self.version_team(version_ref)
        if version_team != alias_team:
            raise FailedPrecondition(
                f"candidate {version_ref!r} belongs to team {version_team!r} but alias "
                f"{alias!r} to team {alias_team!r}: a release stays within one team "
                "(SetRoute moves an alias to another team)"
            )

    async def may_view(self, route: gateway_pb2.Route) -> bool:
        caller = auth.current()
        if self._unchecked(caller):
            return True
        # A past release from the registry's history may lack the stable version.
        version = route.stable_version_id or route.candidate_version_id
        if not version:
            return False
        try:
            team = await self.version_team(version)
        except NotFound:
            # A route to a version the registry no longer has (deleted, another
            # installation's Redis) is nobody's to see; it must not fail the listing.
            return False
        return caller.can(team, Role.viewer)

    async def require_model(self, model: str) -> AuthPrincipal:
        """Generate's check: the base model is open to every authenticated key; an alias
        or a version needs a role in its team. Unknown models pass here and get the
        request path's own NOT_FOUND."""
        caller = auth.current()
        if self._unchecked(caller) or not model or model == BASE_MODEL:
            return caller
        # "adapter:number" is never an alias (aliases may not contain ':').
        route = None if ":" in model else await self._routes.lookup(model)
        if route is not None and route.stable_version_id:
            return await self.require_alias(model, Role.viewer, "Generate")
        try:
            return await self.require_version(model, Role.viewer, "Generate")
        except NotFound:
            return caller


class GuardedGateway(Gateway):
    """The gateway's data plane behind authorization and the per-key rate limit."""

    def __init__(
        self, *args: Any, access: AliasAccess, limiter: RateLimiter | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.access = access
        self.limiter = limiter

    async def _admit(self, request: gateway_pb2.GenerateRequest) -> None:
        caller = await self.access.require_model(request.model)
        if self.limiter is not None:
            await self.limiter.check(caller)

    async def generate(
        self, request: gateway_pb2.GenerateRequest, caller: Caller | None = None
    ) -> gateway_pb2.GenerateResponse:
        await self._admit(request)
        return await super().generate(request, caller)

    async def generate_stream(
        self, request: gateway_pb2.GenerateRequest, caller: Caller | None = None
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        await self._admit(request)
        async for chunk in super().generate_stream(request, caller):
            yield chunk
