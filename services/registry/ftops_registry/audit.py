"""The audit log: who changed what, when, and whether the registry allowed it.

A successful mutation writes its entry with ``record`` inside the mutation's own
transaction, so a change is never committed without its entry (nor an entry without its
change). A refused or failed mutation is recorded by the servicer afterwards in a short
transaction of its own (``record_failure``), since the mutation's transaction rolled back.

The actor is the caller the runtime's auth interceptor resolved (``current_principal``:
an API key id, or "anonymous" with authentication off); it is a context variable, and
``Database.run`` copies the context onto its worker thread. Event-driven changes name the
event's producer instead.

Refusals of every service (the registry's unauthenticated calls included) arrive
aggregated (``record_denials``): the registry's own from its ``DenialRecorder``, the other
services' as ``audit.denied`` batches. Their actor is the id of the key presented
("anonymous" when none was), their resource ``service:<service>``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftops.events.v1 import events_pb2
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
# How far back a redelivered audit.denied batch is looked for (redeliveries come within
# minutes; the ``at`` index keeps the look cheap).
_REDELIVERY_WINDOW = timedelta(days=1)


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

    def record_denials(self, entries: Sequence[events_pb2.AccessDenied], batch_id: str = "") -> int:
        """Refusals (aggregated) in one transaction; a batch already written (an
        ``audit.denied`` redelivered: same ``batch_id``) is not written again. Returns
        the number of entries written."""
        if not entries:
            return 0
        tag = f" [{batch_id}]" if batch_id else ""

        def work(s: Session) -> int:
            if tag:
                seen = s.scalar(
                    select(AuditRow.id)
                    .where(AuditRow.at >= utcnow() - _REDELIVERY_WINDOW)
                    .where(AuditRow.detail.endswith(tag, autoescape=True))
                    .limit(1)
                )
                if seen is not None:
                    return 0
            for entry in entries:
                record(
                    s,
                    entry.method,
                    f"service:{entry.service}",
                    team=entry.team,
                    outcome=entry.code,
                    detail=denial_detail(entry)[: MAX_DETAIL - len(tag)] + tag,
                    actor=entry.key_id or "anonymous",
                )
            return len(entries)

        return self.db.write(work)

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


def denial_detail(entry: events_pb2.AccessDenied) -> str:
    """The reason, and where and how often: "<reason> (12 times from 10.0.0.7, 09:00:01
    to 09:00:02)"."""
    source = entry.source or "an unknown address"
    if entry.count <= 1:
        return f"{entry.reason} (from {source})"
    first = entry.first_at.ToDatetime().strftime("%H:%M:%S")
    last = entry.last_at.ToDatetime().strftime("%H:%M:%S")
    return f"{entry.reason} ({entry.count} times from {source}, {first} to {last} UTC)"


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
