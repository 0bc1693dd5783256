"""Who may call an inference replica. The gateway calls it with its own service key;
operators with theirs. A version's team comes from the registry (``auth.VersionTeams``);
the base model is open to every authenticated key."""

from __future__ import annotations

from ftops_runtime import auth
from ftops_runtime.auth import AuthPrincipal, Role

BASE = ("", "base")


class InferenceAccess:
    """``enforce=False`` (auth off) lets every call through without lookups."""

    def __init__(self, teams: auth.VersionTeams, *, enforce: bool) -> None:
        self._teams = teams
        self._enforce = enforce

    async def require_version(self, ref: str, role: Role, action: str) -> AuthPrincipal:
        caller = auth.current()
        if not self._enforce or caller.platform_admin or ref in BASE:
            return caller
        return auth.require(await self._teams.team(ref), role, action=f"{action} of {ref!r}")

    def require_platform_admin(self, action: str) -> AuthPrincipal:
        caller = auth.current()
        if not self._enforce:
            return caller
        return auth.require_platform_admin(action=action)
