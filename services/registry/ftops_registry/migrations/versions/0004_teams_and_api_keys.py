"""Teams, API keys (hashed) with a role per team, and which teams may use an artifact.

Existing adapters' and job records' team names become teams, and the artifacts their
versions and jobs reference become usable by those teams, so an installation keeps
working once keys are handed out.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:00:00.000000
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from ftops.trainer.v1 import trainer_pb2

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    teams = op.create_table(
        "teams",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_teams")),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("platform_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_api_keys")),
    )
    op.create_table(
        "api_key_roles",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("team", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.key_id"],
            name=op.f("fk_api_key_roles_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["team"], ["teams.name"], name=op.f("fk_api_key_roles_team_teams")),
        sa.PrimaryKeyConstraint("key_id", "team", name=op.f("pk_api_key_roles")),
    )
    op.create_index(op.f("ix_api_key_roles_team"), "api_key_roles", ["team"], unique=False)
    artifact_teams = op.create_table(
        "artifact_teams",
        sa.Column("artifact_id", sa.String(length=64), nullable=False),
        sa.Column("team", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["artifact_id"],
            ["artifacts.artifact_id"],
            name=op.f("fk_artifact_teams_artifact_id_artifacts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("artifact_id", "team", name=op.f("pk_artifact_teams")),
    )
    op.create_index(op.f("ix_artifact_teams_team"), "artifact_teams", ["team"], unique=False)
    _backfill(teams, artifact_teams)


def _backfill(teams: sa.Table, artifact_teams: sa.Table) -> None:
    bind = op.get_bind()
    adapters = sa.table("adapters", sa.column("name"), sa.column("team"))
    versions = sa.table(
        "versions",
        sa.column("adapter"),
        sa.column("artifact_id"),
        sa.column("replay_artifact_id"),
        sa.column("dataset_artifact_id"),
    )
    jobs = sa.table("jobs", sa.column("team"), sa.column("job"))
    artifacts = sa.table("artifacts", sa.column("artifact_id"))

    names = set(bind.scalars(sa.select(adapters.c.team).where(adapters.c.team != "")))
    uses: set[tuple[str, str]] = set()
    rows = bind.execute(
        sa.select(
            adapters.c.team,
            versions.c.artifact_id,
            versions.c.replay_artifact_id,
            versions.c.dataset_artifact_id,
        )
        .join(adapters, adapters.c.name == versions.c.adapter)
        .where(adapters.c.team != "")
    )
    for team, *refs in rows:
        uses.update((ref, team) for ref in refs if ref)
    for team, blob in bind.execute(sa.select(jobs.c.team, jobs.c.job).where(jobs.c.team != "")):
        names.add(team)
        dataset = trainer_pb2.Job.FromString(blob).spec.dataset_artifact_id
        if dataset:
            uses.add((dataset, team))
    existing = set(bind.scalars(sa.select(artifacts.c.artifact_id)))
    now = datetime.now(UTC)
    if names:
        op.bulk_insert(
            teams, [{"name": n, "description": "", "created_at": now} for n in sorted(names)]
        )
    grants = [{"artifact_id": a, "team": t} for a, t in sorted(uses) if a in existing]
    if grants:
        op.bulk_insert(artifact_teams, grants)


def downgrade() -> None:
    op.drop_index(op.f("ix_artifact_teams_team"), table_name="artifact_teams")
    op.drop_table("artifact_teams")
    op.drop_index(op.f("ix_api_key_roles_team"), table_name="api_key_roles")
    op.drop_table("api_key_roles")
    op.drop_table("api_keys")
    op.drop_table("teams")
