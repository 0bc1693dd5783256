"""The MonitorService gRPC surface: thin, delegating to Monitor."""

from __future__ import annotations

from typing import Any

from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops_monitor.monitor import Monitor


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    async def GetVersionStats(
        self, request: monitor_pb2.GetVersionStatsRequest, context: Any
    ) -> monitor_pb2.VersionStats:
        return self._monitor.version_stats(request.alias, request.version_id)

    async def ListVersionStats(
        self, request: monitor_pb2.ListVersionStatsRequest, context: Any
    ) -> monitor_pb2.ListVersionStatsResponse:
        return self._monitor.list_stats(request.alias)

    async def GetReleaseAnalysis(
        self, request: monitor_pb2.GetReleaseAnalysisRequest, context: Any
    ) -> monitor_pb2.ReleaseAnalysis:
        return self._monitor.analysis(request.alias)

    async def PromoteRelease(
        self, request: monitor_pb2.ReleaseDecisionRequest, context: Any
    ) -> monitor_pb2.ReleaseAnalysis:
        return await self._monitor.promote(request.alias, request.reason)

    async def RollbackRelease(
        self, request: monitor_pb2.ReleaseDecisionRequest, context: Any
    ) -> monitor_pb2.ReleaseAnalysis:
        return await self._monitor.rollback(request.alias, request.reason)

    async def SubmitFeedback(
        self, request: monitor_pb2.SubmitFeedbackRequest, context: Any
    ) -> monitor_pb2.SubmitFeedbackResponse:
        return self._monitor.submit_feedback(request.request_id, request.score, request.comment)

    async def ListAlerts(
        self, request: monitor_pb2.ListAlertsRequest, context: Any
    ) -> monitor_pb2.ListAlertsResponse:
        return self._monitor.list_alerts(request.alias)
