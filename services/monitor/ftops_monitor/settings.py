"""Monitor settings (env vars ``FTOPS_<FIELD>``)."""

from __future__ import annotations

from pydantic import Field

from ftops_runtime.settings import ServiceSettings


class MonitorSettings(ServiceSettings):
    window_s: float = Field(60.0, gt=0, description="Sliding window of the per-version stats.")
    analysis_interval_s: float = Field(0.5, gt=0, description="How often releases are analysed.")
    metrics_durable: str = Field(
        "monitor", description="Durable consumer of metrics.requests shared by monitor replicas."
    )
    release_consumer_inactive_s: float = Field(
        300.0,
        gt=0,
        description="A stopped replica's release-event consumers vanish after this.",
    )
