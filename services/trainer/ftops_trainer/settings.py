"""Trainer settings (environment variables ``FTOPS_<FIELD>``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ftops_runtime.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    registry_address: str = Field(
        "127.0.0.1:50051", description="gRPC address (host:port) of the registry service."
    )
    registry_api_key: str = Field("", description="API key sent to the registry, if it wants one.")
    work_dir: Path = Field(
        Path(".ftops/trainer"), description="Scratch space for adapters and parent downloads."
    )
    max_concurrent_jobs: int = Field(1, ge=1, description="Jobs trained at the same time.")
    max_bad_line_ratio: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of bad dataset lines tolerated (skipped); above it the job fails.",
    )
    torch_threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default.")
    progress_interval_s: float = Field(
        1.0, ge=0, description="Least time between progress updates (job record and events)."
    )
