"""Monitor settings (env vars ``FTOPS_<FIELD>``)."""

from __future__ import annotations

from pydantic import Field

from ftops_runtime.auth import AuthSettings
from ftops_runtime.settings import ServiceSettings


class MonitorSettings(ServiceSettings, AuthSettings):
    window_s: float = Field(60.0, gt=0, description="Sliding window of the per-version stats.")
    analysis_interval_s: float = Field(
        0.25,
        gt=0,
        description="Longest pause between release analyses (a result batch triggers one at once).",
    )
    # No shared results consumer to name: every replica reads all of metrics.requests on
    # its own consumer (service.py), so replicas judge the same evidence.
    release_consumer_inactive_s: float = Field(
        300.0,
        gt=0,
        description="A stopped replica's consumers (request results, release events) vanish "
        "after this.",
    )
    registry_address: str = Field(
        "127.0.0.1:50051",
        description="Registry gRPC host:port, for the versions' evaluations at release start "
        "(unreachable: that check is skipped).",
    )
    registry_api_key: str = Field(
        "",
        description="The monitor's own key for registry calls: viewer in every team whose "
        "releases it judges (or a platform-admin service key).",
    )
    registry_timeout_s: float = Field(5.0, gt=0, description="Deadline of registry calls.")
    metrics_port: int = Field(
        9464,
        ge=-1,
        le=65535,
        description="Prometheus scrape endpoint http://<grpc_host>:<port>/metrics; "
        "0 picks a free port, -1 turns it off.",
    )
    feedback_max_age_s: float = Field(
        3600.0, gt=0, description="Feedback is accepted for requests served this recently."
    )
    feedback_max_requests: int = Field(
        200_000, gt=0, description="Request ids remembered for feedback (oldest dropped first)."
    )
    alert_error_rate: float = Field(
        0.1, ge=0, le=1, description="Alert when a version's error rate is above this; 0 = off."
    )
    alert_latency_p99_ms: float = Field(
        0.0, ge=0, description="Alert when a version's p99 latency (ms) is above this; 0 = off."
    )
    alert_feedback_below: float = Field(
        0.0, ge=0, le=1, description="Alert when a version's mean feedback is below this; 0 = off."
    )
    alert_for_s: float = Field(
        30.0, ge=0, description="How long a condition must hold before its alert fires."
    )
    alert_min_requests: int = Field(
        10, ge=1, description="Window results (or scores) needed before an alert rule can hold."
    )
    alert_release_held_for_s: float = Field(
        5.0,
        ge=0,
        description="How long a release step must be held (failures that are not the "
        "candidate's) before its alert fires.",
    )
