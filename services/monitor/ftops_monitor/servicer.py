"""The MonitorService gRPC surface: thin, delegating to Monitor after checking the caller
against the team of what it asks about (the rules: visibility.py)."""

from __future__ import annotations

import logging
from typing import Any

from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops_monitor.monitor import Monitor
from ftops_monitor.visibility import TeamView
from ftops_runtime import auth
from ftops_runtime.auth import AuthPrincipal, Role

log = logging.getLogger(__name__)


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, monitor: Monitor, view: TeamView) -> None:
        self._monitor = monitor
        self._view = view

    # -- authorization ---------------------------------------------------------------

    async def _require(self, alias: str, version_id: str, role: Role, action: str) -> None:
        """``role`` in the team of the alias (else of the version). Nothing known about
        either passes: the call itself answers NOT_FOUND."""
        caller = auth.current()
        if caller.platform_admin:  # also every call with auth off: no lookups
            return
        team = await self._view.team(alias, version_id)
        if team is None:
            return
        what = f"alias {alias!r}" if alias else f"version {version_id!r}"
        auth.require(team, role, action=f"{action} on {what}")

    async def _may_view(self, caller: AuthPrincipal, alias: str, version_id: str) -> bool:
        return await self._view.may_view(caller, alias, version_id)

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
