"""The MonitorService gRPC surface: thin, delegating to Monitor after checking the caller
against the team of what it asks about.

An alias belongs to the team of its release's stable version (the candidate is of the
same team: the gateway refuses anything else); a version to its adapter's team, which the
registry tells once per version (versions are immutable)."""

from __future__ import annotations

import logging
from typing import Any

from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops_monitor.monitor import Monitor
from ftops_runtime import auth
from ftops_runtime.auth import AuthPrincipal, Role
from ftops_runtime.errors import NotFound

log = logging.getLogger(__name__)


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, monitor: Monitor, teams: auth.VersionTeams) -> None:
        self._monitor = monitor
        self._teams = teams

    # -- authorization ---------------------------------------------------------------

    def _alias_version(self, alias: str) -> str:
        """A version the alias served (its release's stable one first), or ""."""
        release = self._monitor.release_for(alias)
        if release is not None:
            return release.stable_version_id
        return next((v for a, v in self._monitor.stats.keys(alias) if a == alias and v), "")

    async def _require(self, alias: str, version_id: str, role: Role, action: str) -> None:
        """``role`` in the team of the alias (else of the version). Nothing known about
        either passes: the call itself answers NOT_FOUND."""
        caller = auth.current()
        if caller.platform_admin:  # also every call with auth off: no lookups
            return
        version = (self._alias_version(alias) if alias else "") or version_id
        if not version:
            return
        try:
            team = await self._teams.team(version)
        except NotFound:
            return
        what = f"alias {alias!r}" if alias else f"version {version_id!r}"
        auth.require(team, role, action=f"{action} on {what}")

    async def _may_view(self, caller: AuthPrincipal, alias: str, version_id: str) -> bool:
        if caller.platform_admin:
            return True
        version = (self._alias_version(alias) if alias else "") or version_id
        if not version:
            return False
        try:
            return caller.can(await self._teams.team(version), Role.viewer)
        except NotFound:
            return False

    # -- RPCs ------------------------------------------------------------------------

    async def GetVersionStats(
        self, request: monitor_pb2.GetVersionStatsRequest, context: Any
    ) -> monitor_pb2.VersionStats:
        await self._require(request.alias, request.version_id, Role.viewer, "GetVersionStats")
        return self._monitor.version_stats(request.alias, request.version_id)

    async def ListVersionStats(
        self, request: monitor_pb2.ListVersionStatsRequest, context: Any
    ) -> monitor_pb2.ListVersionStatsResponse:
        if request.alias:
            await self._require(request.alias, "", Role.viewer, "ListVersionStats")
        listed = self._monitor.list_stats(request.alias)
        caller = auth.current()
        if caller.platform_admin:
            return listed
        visible = [s for s in listed.stats if await self._may_view(caller, s.alias, s.version_id)]
        return monitor_pb2.ListVersionStatsResponse(stats=visible)

    async def GetReleaseAnalysis(
        self, request: monitor_pb2.GetReleaseAnalysisRequest, context: Any
    ) -> monitor_pb2.ReleaseAnalysis:
        await self._require(request.alias, "", Role.viewer, "GetReleaseAnalysis")
        return self._monitor.analysis(request.alias)

    async def SubmitFeedback(
        self, request: monitor_pb2.SubmitFeedbackRequest, context: Any
    ) -> monitor_pb2.SubmitFeedbackResponse:
        # Whoever may call the alias (or version) that answered may rate the answer.
        served = self._monitor.requests.get(request.request_id) if request.request_id else None
        if served is not None:
            await self._require(served.alias, served.version_id, Role.viewer, "SubmitFeedback")
        # Answers once JetStream stored the score for every replica (UNAVAILABLE if not).
        return await self._monitor.submit_feedback(
            request.request_id, request.score, request.comment
        )

    async def ListAlerts(
        self, request: monitor_pb2.ListAlertsRequest, context: Any
    ) -> monitor_pb2.ListAlertsResponse:
        if request.alias:
            await self._require(request.alias, "", Role.viewer, "ListAlerts")
        listed = self._monitor.list_alerts(request.alias)
        caller = auth.current()
        if caller.platform_admin:
            return listed
        visible = [a for a in listed.alerts if await self._may_view(caller, a.alias, a.version_id)]
        return monitor_pb2.ListAlertsResponse(alerts=visible)
