"""Which team owns a resource: what the servicer authorizes calls against.

Adapters carry their team (versions, aliases, lineage and retention follow their
adapter); artifacts are usable by the teams in ``artifact_teams``; job records carry the
job spec's team. Teams never change once set, so reading the owner before the mutation's
own transaction cannot race with it.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select

from ftops_registry.db import Database
from ftops_registry.models import AdapterRow, ArtifactRow, ArtifactTeamRow, JobRow


def adapter_team(db: Database, adapter: str) -> str | None:
    """The adapter's team ("" for one created without a team), None if it does not exist."""
    with db.read() as s:
        row = s.get(AdapterRow, adapter) if adapter else None
        return row.team if row is not None else None


def artifact_teams(db: Database, artifact_ids: Iterable[str]) -> dict[str, set[str]]:
    """The teams that may use each artifact; unknown ids are left out (the core reports
    them as not uploaded)."""
    ids = sorted({a for a in artifact_ids if a})
    out: dict[str, set[str]] = {}
    if ids:
        with db.read() as s:
            known = s.scalars(
                select(ArtifactRow.artifact_id).where(ArtifactRow.artifact_id.in_(ids))
            )
            out = {a: set() for a in known}
            rows = s.execute(
                select(ArtifactTeamRow.artifact_id, ArtifactTeamRow.team).where(
                    ArtifactTeamRow.artifact_id.in_(ids)
                )
            )
            for artifact_id, team in rows:
                out[artifact_id].add(team)
    return out


def job_team(db: Database, job_id: str) -> str | None:
    with db.read() as s:
        row = s.get(JobRow, job_id) if job_id else None
        return row.team if row is not None else None
