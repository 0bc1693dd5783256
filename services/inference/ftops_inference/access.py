"""Who may call an inference replica. The gateway calls it with its own service key;
operators with theirs. A version's team comes from the registry (cached: a version never
changes team); the base model is open to every authenticated key."""

from __future__ import annotations

import grpc

from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_runtime import auth
from ftops_runtime.auth import AuthPrincipal, Role
from ftops_runtime.errors import NotFound, Unavailable

BASE = ("", "base")


class InferenceAccess:
    """``enforce=False`` (auth off) lets every call through without lookups."""

    def __init__(
        self,
        registry: registry_pb2_grpc.RegistryServiceStub,
        *,
        enforce: bool,
        timeout_s: float = 10.0,
    ) -> None:
        self._registry = registry
        self._enforce = enforce
        self._timeout_s = timeout_s
        self._teams: dict[str, str] = {}

    async def _team(self, ref: str) -> str:
        team = self._teams.get(ref)
        if team is not None:
            return team
        request = (
            registry_pb2.GetVersionRequest(name=ref)
            if ":" in ref
            else registry_pb2.GetVersionRequest(version_id=ref)
        )
        try:
            version = await self._registry.GetVersion(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"adapter version {ref} is not in the registry") from exc
            raise Unavailable(f"cannot check access to {ref}: {exc.details()}") from exc
        self._teams[ref] = version.team
        return str(version.team)

    async def require_version(self, ref: str, role: Role, action: str) -> AuthPrincipal:
        caller = auth.current()
        if not self._enforce or caller.platform_admin or ref in BASE:
            return caller
        return auth.require(await self._team(ref), role, action=f"{action} of {ref!r}")

    def require_platform_admin(self, action: str) -> AuthPrincipal:
        caller = auth.current()
        if not self._enforce:
            return caller
        return auth.require_platform_admin(action=action)
