"""The audit log: who changed what, when, and whether the registry allowed it.

A successful mutation writes its entry with ``record`` inside the mutation's own
transaction, so a change is never committed without its entry (nor an entry without its
change). A refused or failed mutation is recorded by the servicer afterwards in a short
transaction of its own (``record_failure``), since the mutation's transaction rolled back.

The actor is the caller the runtime's auth interceptor resolved (``current_principal``:
an API key id, or "anonymous" with authentication off); it is a context variable, and
``Database.run`` copies the context onto its worker thread. Event-driven changes name the
event's producer instead.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftops.registry.v1 import registry_pb2
from ftops_registry import convert
from ftops_registry.db import Database
from ftops_registry.models import AdapterRow, AuditRow, utcnow
from ftops_registry.paging import decode_token, encode_token
from ftops_runtime.interceptors import current_principal

OK = "ok"
MAX_DETAIL = 2000
# Same as the other list RPCs (not imported: the registry core imports this module).
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500


def caller() -> str:
    return current_principal.get().key_id or "anonymous"


def record(
    s: Session,
    method: str,
    resource: str,
    *,
    team: str = "",
    outcome: str = OK,
    detail: str = "",
    actor: str | None = None,
) -> None:
    s.add(
        AuditRow(
            at=utcnow(),
            actor=actor if actor is not None else caller(),
            team=team,
            method=method,
            resource=resource[:255],
            outcome=outcome,
            detail=detail[:MAX_DETAIL],
        )
    )


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record_failure(
        self,
        method: str,
        resource: str,
        outcome: str,
        detail: str,
        adapter: str = "",
        team: str = "",
    ) -> None:
        """A refused mutation, in its own transaction (the mutation's rolled back). The
        team comes from the adapter when it exists, so team filters show refusals too."""

        def work(s: Session) -> None:
            row = s.get(AdapterRow, adapter) if adapter and not team else None
            owner = team or (row.team if row is not None else "")
            record(s, method, resource, team=owner, outcome=outcome, detail=detail)

        self.db.write(work)

    def list(
        self,
        team: str = "",
        resource_prefix: str = "",
        since: datetime | None = None,
        size: int = 0,
        token: str = "",
        teams: Collection[str] | None = None,
    ) -> registry_pb2.ListAuditResponse:
        """Newest first by id (ids grow with commit order closely enough, and unlike
        timestamps never tie), keyset-paginated so new entries do not shift pages.
        ``teams``: only entries of these teams (None: any)."""
        before = decode_token(token) or None  # ids start at 1
        limit = DEFAULT_PAGE_SIZE if size == 0 else min(size, MAX_PAGE_SIZE)
        query = select(AuditRow)
        if team:
            query = query.where(AuditRow.team == team)
        if teams is not None:
            query = query.where(AuditRow.team.in_(list(teams)))
        if resource_prefix:
            query = query.where(AuditRow.resource.startswith(resource_prefix, autoescape=True))
        if since is not None:
            query = query.where(AuditRow.at >= since)
        if before is not None:
            query = query.where(AuditRow.id < before)
        query = query.order_by(AuditRow.id.desc()).limit(limit + 1)
        with self.db.read() as s:
            rows = s.scalars(query).all()
            page = rows[:limit]
            return registry_pb2.ListAuditResponse(
                entries=[_entry(r) for r in page],
                next_page_token=encode_token(page[-1].id) if len(rows) > limit else "",
            )


def _entry(row: AuditRow) -> registry_pb2.AuditEntry:
    return registry_pb2.AuditEntry(
        id=row.id,
        at=convert.timestamp(row.at),
        actor=row.actor,
        team=row.team,
        method=row.method,
        resource=row.resource,
        outcome=row.outcome,
        detail=row.detail,
    )
