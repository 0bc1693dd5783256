"""Protobuf views of the monitor's state (the gRPC read API)."""

from __future__ import annotations

from ftops.events.v1 import events_pb2
from ftops.monitor.v1 import monitor_pb2
from ftops_monitor.alerts import AlertState
from ftops_monitor.analysis import Decision, Release
from ftops_monitor.windows import Figures


def version_stats(
    alias: str, version_id: str, f: Figures, window_s: float
) -> monitor_pb2.VersionStats:
    return monitor_pb2.VersionStats(
        alias=alias,
        version_id=version_id,
        requests=f.requests,
        errors=f.errors,
        error_rate=f.error_rate,
        latency_p50_ms=f.latency_p50_ms,
        latency_p95_ms=f.latency_p95_ms,
        latency_p99_ms=f.latency_p99_ms,
        ttft_p50_ms=f.ttft_p50_ms,
        ttft_p95_ms=f.ttft_p95_ms,
        tokens_per_second=f.tokens_per_second,
        window_seconds=window_s,
        ok_requests=f.ok_requests,
        feedback_count=f.feedback_count,
        feedback_mean=f.feedback_mean,
        divergence_count=f.divergence_count,
        divergence_mean=f.divergence_mean,
    )


def release_analysis(
    release: Release,
    stable: monitor_pb2.VersionStats,
    candidate: monitor_pb2.VersionStats,
    current: Decision | None,
    now: float,
) -> monitor_pb2.ReleaseAnalysis:
    """``current`` is the verdict on the running step right now (None once finished)."""
    out = monitor_pb2.ReleaseAnalysis(
        alias=release.alias,
        release_id=release.release_id,
        state=release.state.value,
        step_index=release.step_index,
        weight=release.weight,
        stable=stable,
        candidate=candidate,
        last_decision=release.last_decision,
        last_reason=release.last_reason,
        strategy=release.strategy.value,
        paused=release.paused,
        stable_version_id=release.stable_version_id,
        candidate_version_id=release.candidate_version_id,
        step_seconds=max(0.0, now - release.step_started_at) if release.running else 0.0,
    )
    out.figures.update(release.evaluation_figures)
    if current is not None:
        out.figures.update(current.figures)
        out.checks.extend(
            monitor_pb2.Check(name=c.name, status=c.status, detail=c.detail) for c in current.checks
        )
        out.verdict = current.verdict
    return out


def alert_event(state: AlertState, status: str, for_seconds: float) -> events_pb2.Alert:
    return events_pb2.Alert(
        rule=state.rule,
        alias=state.alias,
        version_id=state.version_id,
        state=status,
        value=state.value,
        threshold=state.threshold,
        message=state.message,
        for_seconds=for_seconds,
    )
