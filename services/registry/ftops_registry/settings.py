"""Registry settings (``FTOPS_DATABASE_URL``, ``FTOPS_ARTIFACT_DIR``, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ftops_runtime.auth import AuthSettings
from ftops_runtime.settings import ServiceSettings


class RegistrySettings(ServiceSettings, AuthSettings):
    database_url: str = Field(
        "sqlite:///.ftops/registry.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db.",
    )
    artifact_store: Literal["local", "nats"] = Field(
        "local",
        description="Where artifact blobs live: local (artifact_dir, one machine) or nats (a "
        "JetStream Object Store bucket on nats_url, shared by replicas on many machines).",
    )
    artifact_dir: Path = Field(
        Path(".ftops/artifacts"),
        description="Where artifact blobs are stored by sha256 (local store), or spooled while "
        "an upload is verified (nats store).",
    )
    artifact_bucket: str = Field(
        "ftops-artifacts", description="Object Store bucket of the nats artifact store."
    )
    max_artifact_mb: int = Field(
        4096, gt=0, description="Largest artifact (sum of its files) accepted by an upload."
    )
    max_lora_rank: int = Field(
        256,
        gt=0,
        description="Largest LoRA rank an uploaded adapter may have (its adapter_config.json "
        "and tensor shapes); higher is refused with INVALID_ARGUMENT.",
    )
    artifact_gc_grace_s: float = Field(
        3600,
        ge=0,
        description="GarbageCollectArtifacts leaves artifacts and blobs younger than this "
        "(an upload's version may not be registered yet).",
    )
    retention_keep_last: int = Field(
        0,
        ge=0,
        description="Scheduled retention: every retention_interval_s, archive all but the "
        "newest N versions of each adapter (never one an alias, a running release or an "
        "unfinished job needs) and garbage-collect the artifacts nothing needs, as "
        "ArchiveVersions and GarbageCollectArtifacts do; 0 = off (an operator runs them).",
    )
    retention_interval_s: float = Field(
        3600, gt=0, description="How often scheduled retention runs (retention_keep_last > 0)."
    )
    db_pool_size: int = Field(8, gt=0, description="Database connections (and DB threads).")
    bootstrap_admin_key: str = Field(
        "",
        description="A platform-admin API key ('ftk_<id>_<secret>') made sure to exist at start, "
        "so a fresh installation has someone to create teams and keys. Stored hashed; or "
        "run `ftops-registry bootstrap-admin` once instead.",
    )
