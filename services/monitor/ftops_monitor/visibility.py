"""Which aliases and versions a caller may see: those of the teams where its key holds a
role (any role reads), all of them for a platform admin (and with access control off).

An alias belongs to the team of its release's stable version (the candidate is of the
same team: the gateway refuses anything else), or of a version it served; a version to
its adapter's team, which the registry tells once per version (versions never change
team). The gRPC servicer, ``/metrics`` and the dashboard decide with the same rules."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from ftops_monitor.monitor import Monitor
from ftops_runtime import auth
from ftops_runtime.auth import AuthPrincipal, Role
from ftops_runtime.errors import NotFound, Unavailable

log = logging.getLogger(__name__)

# (alias, version_id) -> whether the caller may see it; either may be "".
Sees = Callable[[str, str], bool]


def everything(alias: str, version_id: str) -> bool:
    return True


def monitor_pairs(monitor: Monitor) -> Iterator[tuple[str, str]]:
    """Every (alias, version) the monitor's figures, releases and alerts name."""
    yield from monitor.stats.keys(None)
    for alias, version_id, _, _ in list(monitor.results_total):
        yield alias, version_id
    for alias, _ in list(monitor.decisions_total):
        yield alias, ""
    for release in monitor.latest_releases():
        yield release.alias, release.stable_version_id
    for alert in monitor.active_alerts():
        yield alert.alias, alert.version_id


class TeamView:
    """The team of an alias or version, looked up once and remembered, so a filter over
    thousands of series is a dictionary lookup per series."""

    def __init__(self, monitor: Monitor, teams: auth.VersionTeams) -> None:
        self._monitor = monitor
        self._teams = teams
        # version reference -> its team. Unknown versions are not remembered: a version id
        # asked about before it exists must not stay teamless once it is registered.
        self._known: dict[str, str] = {}

    def alias_version(self, alias: str) -> str:
        """A version the alias served (its release's stable one first), or ""."""
        release = self._monitor.release_for(alias)
        if release is not None:
            return release.stable_version_id
        return next((v for a, v in self._monitor.stats.keys(alias) if a == alias and v), "")

    def _ref(self, alias: str, version_id: str) -> str:
        return (self.alias_version(alias) if alias else "") or version_id

    async def team(self, alias: str, version_id: str) -> str | None:
        """The team of the alias (else of the version); None when neither is known.
        Raises Unavailable when the registry cannot be asked."""
        ref = self._ref(alias, version_id)
        if not ref:
            return None
        if ref in self._known:
            return self._known[ref]
        try:
            team = await self._teams.team(ref)
        except NotFound:
            return None
        self._known[ref] = team
        return team

    async def may_view(self, caller: AuthPrincipal, alias: str, version_id: str) -> bool:
        if caller.platform_admin:
            return True
        team = await self.team(alias, version_id)
        return team is not None and caller.can(team, Role.viewer)

    async def learn(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Look up the teams not known yet. While the registry cannot be asked, what it
        would tell stays hidden from everyone but platform admins (asked again next time)."""
        for alias, version_id in set(pairs):
            ref = self._ref(alias, version_id)
            if not ref or ref in self._known:
                continue
            try:
                await self.team(alias, version_id)
            except Unavailable as exc:
                log.warning("teams not known yet, their aliases stay hidden: %s", exc)
                return

    def sees(self, caller: AuthPrincipal) -> Sees:
        """The caller's filter over what is known now (``learn`` first)."""
        if caller.platform_admin:
            return everything

        def sees(alias: str, version_id: str) -> bool:
            team = self._known.get(self._ref(alias, version_id))
            return team is not None and caller.can(team, Role.viewer)

        return sees

    async def scope(self, caller: AuthPrincipal, pairs: Iterable[tuple[str, str]]) -> Sees:
        """``sees`` after learning the teams of ``pairs``."""
        if not caller.platform_admin:
            await self.learn(pairs)
        return self.sees(caller)
