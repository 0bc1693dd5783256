"""Initial schema: base models, adapters, versions, artifacts, aliases, releases.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 21:54:22.951317
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alias_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("adapter", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("from_version_id", sa.String(length=64), nullable=True),
        sa.Column("to_version_id", sa.String(length=64), nullable=False),
        sa.Column("moved_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_events")),
    )
    op.create_index(op.f("ix_alias_events_adapter"), "alias_events", ["adapter"], unique=False)
    op.create_table(
        "artifacts",
        sa.Column("artifact_id", sa.String(length=64), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("artifact_id", name=op.f("pk_artifacts")),
    )
    op.create_table(
        "base_models",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_base_models")),
    )
    op.create_table(
        "releases",
        sa.Column("release_id", sa.String(length=128), nullable=False),
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("stable_version_id", sa.String(length=64), nullable=False),
        sa.Column("candidate_version_id", sa.String(length=64), nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("current_weight", sa.Integer(), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("release_id", name=op.f("pk_releases")),
    )
    op.create_index(op.f("ix_releases_alias"), "releases", ["alias"], unique=False)
    op.create_table(
        "adapters",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("team", sa.String(length=128), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("last_number", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_model"], ["base_models.name"], name=op.f("fk_adapters_base_model_base_models")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_adapters")),
    )
    op.create_table(
        "artifact_files",
        sa.Column("artifact_id", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["artifact_id"],
            ["artifacts.artifact_id"],
            name=op.f("fk_artifact_files_artifact_id_artifacts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("artifact_id", "path", name=op.f("pk_artifact_files")),
    )
    op.create_table(
        "release_decisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("release_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("manual", sa.Boolean(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["release_id"],
            ["releases.release_id"],
            name=op.f("fk_release_decisions_release_id_releases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_release_decisions")),
        sa.UniqueConstraint("event_id", name=op.f("uq_release_decisions_event_id")),
    )
    op.create_index(
        op.f("ix_release_decisions_release_id"), "release_decisions", ["release_id"], unique=False
    )
    op.create_table(
        "versions",
        sa.Column("version_id", sa.String(length=64), nullable=False),
        sa.Column("adapter", sa.String(length=128), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("parent_version_id", sa.String(length=64), nullable=True),
        sa.Column("artifact_id", sa.String(length=64), nullable=False),
        sa.Column("base_model_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=128), nullable=False),
        sa.Column("dataset_fingerprint", sa.String(length=128), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter"], ["adapters.name"], name=op.f("fk_versions_adapter_adapters")
        ),
        sa.ForeignKeyConstraint(
            ["artifact_id"],
            ["artifacts.artifact_id"],
            name=op.f("fk_versions_artifact_id_artifacts"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_version_id"],
            ["versions.version_id"],
            name=op.f("fk_versions_parent_version_id_versions"),
        ),
        sa.PrimaryKeyConstraint("version_id", name=op.f("pk_versions")),
        sa.UniqueConstraint("adapter", "number", name="uq_versions_adapter_number"),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_versions_idempotency_key")),
    )
    op.create_table(
        "aliases",
        sa.Column("adapter", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version_id", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter"], ["adapters.name"], name=op.f("fk_aliases_adapter_adapters")
        ),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.version_id"], name=op.f("fk_aliases_version_id_versions")
        ),
        sa.PrimaryKeyConstraint("adapter", "name", name=op.f("pk_aliases")),
    )


def downgrade() -> None:
    op.drop_table("aliases")
    op.drop_table("versions")
    op.drop_index(op.f("ix_release_decisions_release_id"), table_name="release_decisions")
    op.drop_table("release_decisions")
    op.drop_table("artifact_files")
    op.drop_table("adapters")
    op.drop_index(op.f("ix_releases_alias"), table_name="releases")
    op.drop_table("releases")
    op.drop_table("base_models")
    op.drop_table("artifacts")
    op.drop_index(op.f("ix_alias_events_adapter"), table_name="alias_events")
    op.drop_table("alias_events")
