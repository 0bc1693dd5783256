"""Database tables (SQLAlchemy 2 typed declarative). The Alembic revisions in
``migrations/versions`` create exactly these; change both together."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


# Explicit constraint names: Alembic and both databases agree on them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class BaseModelRow(Base):
    __tablename__ = "base_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterRow(Base):
    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    team: Mapped[str] = mapped_column(String(128), default="")
    base_model: Mapped[str] = mapped_column(ForeignKey("base_models.name"))
    # The counter new version numbers come from; bumped under a row lock.
    last_number: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    artifact_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set by garbage collection when the blobs went. The row stays because archived
    # versions still reference it (and their lineage shows it); uploading the same
    # files again revives it.
    deleted_at: Mapped[datetime | None] = mapped_column()


class ArtifactFileRow(Base):
    __tablename__ = "artifact_files"

    artifact_id: Mapped[str] = mapped_column(
        ForeignKey("artifacts.artifact_id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(255), primary_key=True)
    # Order the client declared the files in; downloads stream them in this order.
    position: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("adapter", "number", name="uq_versions_adapter_number"),)

    version_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter: Mapped[str] = mapped_column(ForeignKey("adapters.name"))
    number: Mapped[int] = mapped_column(Integer)
    parent_version_id: Mapped[str | None] = mapped_column(ForeignKey("versions.version_id"))
    artifact_id: Mapped[str] = mapped_column(ForeignKey("artifacts.artifact_id"))
    # Snapshot of the base it was trained on, so the version stays self-describing.
    base_model_fingerprint: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(128), default="")
    dataset_fingerprint: Mapped[str] = mapped_column(String(128), default="")
    method: Mapped[str] = mapped_column(String(64), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # "ready" or "rejected" (failed the evaluation gate: listed, never aliased or released).
    state: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")
    # {"gate_passed": bool, "reasons": [str], "metrics": {str: float}}; None: not evaluated.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    replay_artifact_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.artifact_id"))
    dataset_artifact_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.artifact_id"))


class AliasRow(Base):
    __tablename__ = "aliases"

    adapter: Mapped[str] = mapped_column(ForeignKey("adapters.name"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("versions.version_id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AliasEventRow(Base):
    """Every alias move, so "what did prod point at on Tuesday" has an answer."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128))
    from_version_id: Mapped[str | None] = mapped_column(String(64))
    to_version_id: Mapped[str] = mapped_column(String(64))
    moved_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReleaseRow(Base):
    __tablename__ = "releases"

    release_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    alias: Mapped[str] = mapped_column(String(128), index=True)
    stable_version_id: Mapped[str] = mapped_column(String(64), default="")
    candidate_version_id: Mapped[str] = mapped_column(String(64), default="")
    strategy: Mapped[str] = mapped_column(String(32), default="")
    state: Mapped[str] = mapped_column(String(32), default="running")
    current_weight: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[list[int]] = mapped_column(JSON, default=list)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Time of the newest decision applied: older events arriving late never roll state back.
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReleaseDecisionRow(Base):
    __tablename__ = "release_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Unique: the same event delivered twice is one history entry.
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    release_id: Mapped[str] = mapped_column(
        ForeignKey("releases.release_id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    weight: Mapped[int] = mapped_column(Integer, default=0)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text, default="")
    figures: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRow(Base):
    """The trainer's job record. The registry stores the serialized ``trainer.v1.Job`` as
    is and keeps copies of the fields it filters and orders by in columns."""

    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    adapter: Mapped[str] = mapped_column(String(128), index=True)
    team: Mapped[str] = mapped_column(String(128), default="", index=True)
    # ftops.events.v1.JobState value.
    state: Mapped[int] = mapped_column(Integer, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Optimistic concurrency: every write bumps it; writers say which one they read.
    revision: Mapped[int] = mapped_column(BigInteger)
    job: Mapped[bytes] = mapped_column(LargeBinary)


class AuditRow(Base):
    """Who changed what, when, and whether it was allowed. Successful mutations write
    their entry in the same transaction as the change (no change without its entry);
    refused ones in a short transaction of their own."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    team: Mapped[str] = mapped_column(String(128), default="", index=True)
    method: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(255), index=True)
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")


class TeamRow(Base):
    __tablename__ = "teams"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKeyRow(Base):
    """An API key: the SHA-256 of its secret, never the secret (ftops_runtime.auth)."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[str] = mapped_column(String(64))
    platform_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class ApiKeyRoleRow(Base):
    __tablename__ = "api_key_roles"

    key_id: Mapped[str] = mapped_column(
        ForeignKey("api_keys.key_id", ondelete="CASCADE"), primary_key=True
    )
    team: Mapped[str] = mapped_column(ForeignKey("teams.name"), primary_key=True, index=True)
    # ftops_runtime.auth.Role value.
    role: Mapped[str] = mapped_column(String(16))


class ArtifactTeamRow(Base):
    """Which teams may use and download an artifact: the team it was uploaded for and the
    teams whose versions or jobs reference it. Blobs are shared (content-addressed);
    access is not."""

    __tablename__ = "artifact_teams"

    artifact_id: Mapped[str] = mapped_column(
        ForeignKey("artifacts.artifact_id", ondelete="CASCADE"), primary_key=True
    )
    # No foreign key: adapters created before teams existed carry free-form team names.
    team: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)
