"""Version gate fields (state, evaluation, replay/dataset artifacts) and job records.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ARTIFACT_REFS = ("replay_artifact_id", "dataset_artifact_id")


def _fk_name(column: str) -> str:
    return f"fk_versions_{column}_artifacts"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    # Existing versions passed (or predate) the gate: they stay servable as "ready".
    op.add_column(
        "versions",
        sa.Column("state", sa.String(length=16), server_default="ready", nullable=False),
    )
    op.add_column("versions", sa.Column("evaluation", sa.JSON(), nullable=True))
    for column in ARTIFACT_REFS:
        if sqlite:
            # Not batch mode: it rebuilds `versions` (DROP + RENAME), which aliases and child
            # versions reference, and PRAGMA foreign_keys cannot be turned off inside the
            # migration's transaction. SQLite adds a nullable REFERENCES column in place.
            op.execute(
                f"ALTER TABLE versions ADD COLUMN {column} VARCHAR(64) "
                f"CONSTRAINT {_fk_name(column)} REFERENCES artifacts (artifact_id)"
            )
        else:
            op.add_column("versions", sa.Column(column, sa.String(length=64), nullable=True))
            op.create_foreign_key(
                op.f(_fk_name(column)), "versions", "artifacts", [column], ["artifact_id"]
            )

    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(length=128), nullable=False),
        sa.Column("adapter", sa.String(length=128), nullable=False),
        sa.Column("team", sa.String(length=128), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("job", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_adapter"), "jobs", ["adapter"], unique=False)
    op.create_index(op.f("ix_jobs_team"), "jobs", ["team"], unique=False)
    op.create_index(op.f("ix_jobs_state"), "jobs", ["state"], unique=False)
    op.create_index(op.f("ix_jobs_created_at"), "jobs", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_created_at"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_state"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_team"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_adapter"), table_name="jobs")
    op.drop_table("jobs")
    # SQLite cannot drop a column a foreign key uses, so batch mode rebuilds `versions`.
    # Its DROP TABLE fails while aliases or child versions reference rows, unless the
    # connection runs with PRAGMA foreign_keys=OFF (settable only outside a transaction;
    # Database.migrate turns it on, and only ever upgrades).
    with op.batch_alter_table("versions") as batch:
        for column in ARTIFACT_REFS:
            if op.get_bind().dialect.name != "sqlite":
                batch.drop_constraint(op.f(_fk_name(column)), type_="foreignkey")
            batch.drop_column(column)
        batch.drop_column("evaluation")
        batch.drop_column("state")
