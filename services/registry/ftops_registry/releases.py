"""Release history: the registry's record of what happened to each release and when.

Fed by ``route.changed``: the gateway, the only writer of release state, publishes the
release's whole state after every change it applied (start, each promotion, rollback,
pause, resume, replacement), so the history holds what was done, not what was asked (a
monitor decision the gateway ignored, say for a paused release, is never recorded).
``apply_started`` / ``apply_promote`` / ``apply_rollback`` record the release events
themselves (imports of older history). Events are delivered at least once and in no
guaranteed order. So:
each event is one decision row keyed by its unique event id (a redelivery is a no-op), a
decision for a release we have not seen creates it from the event's own fields, and an
older event arriving late is kept in the history without moving the state backwards.

A started or promote event that puts a rejected version (failed evaluation gate) on
traffic is refused (``RejectedVersionError``: dead-lettered, nothing recorded); a rollback
is always recorded, since it takes traffic away.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2
from ftops_registry import audit, convert
from ftops_registry.db import Database
from ftops_registry.models import AdapterRow, ReleaseDecisionRow, ReleaseRow, VersionRow
from ftops_registry.paging import decode_token, encode_token
from ftops_registry.registry import RejectedVersionError, check_name, check_servable, page_size
from ftops_runtime.errors import InvalidArgument, NotFound, PermanentEventError

log = logging.getLogger(__name__)

RUNNING, PAUSED, PROMOTED, ROLLED_BACK = "running", "paused", "promoted", "rolled_back"
# Change kinds that put the release's versions on traffic.
_SERVING_CHANGES = frozenset({"started", "promote", "resumed"})
STRATEGY_PREFIX = "RELEASE_STRATEGY_"


def strategy_name(value: int) -> str:
    """``RELEASE_STRATEGY_CANARY`` -> "canary"; unspecified -> ""."""
    if value == events_pb2.RELEASE_STRATEGY_UNSPECIFIED:
        return ""
    return events_pb2.ReleaseStrategy.Name(value).removeprefix(STRATEGY_PREFIX).lower()  # type: ignore[arg-type]


class ReleaseHistory:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- events ----------------------------------------------------------------------

    def apply_started(self, event: events_pb2.ReleaseStarted) -> bool:
        """Record a started release. Returns False when the event was already recorded."""

        def apply(release: ReleaseRow, created: bool, _newest: bool) -> dict[str, Any]:
            # Fill what the started event knows; a lazily created row lacks these.
            release.alias = event.alias or release.alias
            release.stable_version_id = event.stable_version_id or release.stable_version_id
            release.candidate_version_id = (
                event.candidate_version_id or release.candidate_version_id
            )
            release.strategy = strategy_name(event.strategy) or release.strategy
            release.steps = list(event.steps) or release.steps
            release.started_at = _occurred(event)
            if created:
                release.current_weight = event.current_weight
            return {"kind": "started", "weight": event.current_weight}

        return self._record(
            event,
            event.alias,
            event.stable_version_id,
            event.candidate_version_id,
            apply,
            servable=True,
        )

    def apply_promote(self, event: events_pb2.ReleasePromote) -> bool:
        def apply(release: ReleaseRow, _created: bool, newest: bool) -> dict[str, Any]:
            if newest and release.state == RUNNING:
                release.current_weight = event.weight
                if event.final:
                    release.state = PROMOTED
            return {
                "kind": "promote",
                "weight": event.weight,
                "final": event.final,
                "reason": event.reason,
                "figures": dict(event.figures),
                "manual": event.manual,
            }

        return self._record(
            event,
            event.alias,
            event.stable_version_id,
            event.candidate_version_id,
            apply,
            servable=True,
        )

    def apply_rollback(self, event: events_pb2.ReleaseRollback) -> bool:
        def apply(release: ReleaseRow, _created: bool, _newest: bool) -> dict[str, Any]:
            # A rollback ends the release whenever it happened; after a full promotion it
            # means the previous stable version was restored, so the release is undone too.
            if release.state in (RUNNING, PROMOTED):
                release.state = ROLLED_BACK
                release.current_weight = 0
            return {
                "kind": "rollback",
                "weight": 0,
                "final": True,
                "reason": event.reason,
                "figures": dict(event.figures),
                "manual": event.manual,
            }

        return self._record(
            event, event.alias, event.stable_version_id, event.candidate_version_id, apply
        )

    def apply_route_changed(self, event: events_pb2.RouteChanged) -> bool:
        """Record the change a route.changed carries (False: already recorded, or the
        change touched no release: a plain SetRoute, a retirement)."""
        snap = event.release
        change = snap.change
        if not snap.release_id or not change.event_id or not change.kind:
            return False

        def apply(release: ReleaseRow, _created: bool, newest: bool) -> dict[str, Any]:
            release.alias = event.alias or release.alias
            release.stable_version_id = snap.stable_version_id or release.stable_version_id
            release.candidate_version_id = snap.candidate_version_id or release.candidate_version_id
            release.strategy = strategy_name(snap.strategy) or release.strategy
            release.steps = list(snap.steps) or release.steps
            if snap.HasField("started_at"):
                release.started_at = convert.from_timestamp(snap.started_at)
            if newest:
                # The snapshot is the gateway's state after this change: take it whole.
                release.state = snap.state or release.state
                release.current_weight = 100 if snap.state == PROMOTED else snap.candidate_weight
            return {
                "kind": change.kind,
                "weight": change.weight,
                "final": change.final,
                "reason": change.reason,
                "figures": dict(change.figures),
                "manual": change.manual,
            }

        producer = "/".join(
            p for p in (event.meta.producer_service, event.meta.producer_instance) if p
        )
        return self._record(
            _Source(
                event_id=change.event_id,
                release_id=snap.release_id,
                occurred=convert.from_timestamp(change.occurred_at)
                if change.HasField("occurred_at")
                else _occurred(event),
                producer=change.actor or producer or "unknown",
                method=f"release.{change.kind}",
            ),
            event.alias,
            snap.stable_version_id,
            snap.candidate_version_id,
            apply,
            servable=change.kind in _SERVING_CHANGES,
        )

    def _record(
        self,
        event: events_pb2.ReleaseStarted
        | events_pb2.ReleasePromote
        | events_pb2.ReleaseRollback
        | _Source,
        alias: str,
        stable: str,
        candidate: str,
        apply: Callable[[ReleaseRow, bool, bool], dict[str, Any]],
        *,
        servable: bool = False,
    ) -> bool:
        """``servable``: the event routes traffic to its versions, so none may be rejected."""
        source = event if isinstance(event, _Source) else _Source.of(event)
        event_id = source.event_id
        if not event_id:
            raise PermanentEventError(f"release event for {source.release_id!r} has no event id")
        if not source.release_id:
            raise PermanentEventError(f"release event {event_id} has no release_id")
        occurred = source.occurred

        def work(s: Session) -> bool:
            seen = s.scalar(
                select(ReleaseDecisionRow.id).where(ReleaseDecisionRow.event_id == event_id)
            )
            if seen is not None:
                return False
            if servable:
                for role, version_id in (("stable", stable), ("candidate", candidate)):
                    # Ids the registry does not know are recorded as given (history, not
                    # routing); a known rejected one is refused.
                    version = s.get(VersionRow, version_id) if version_id else None
                    if version is not None:
                        check_servable(version, f"{role} version of release {source.release_id}")
            release = s.get(ReleaseRow, source.release_id, with_for_update=True)
            created = release is None
            if release is None:
                # Decisions can overtake the started event (separate consumers): create the
                # release from what this event says; ``started`` fills the rest later.
                release = ReleaseRow(
                    release_id=source.release_id,
                    alias=alias,
                    stable_version_id=stable,
                    candidate_version_id=candidate,
                    strategy="",
                    state=RUNNING,
                    current_weight=0,
                    steps=[],
                    started_at=occurred,
                    updated_at=occurred,
                )
                s.add(release)
                s.flush()
            newest = created or occurred >= convert.as_utc(release.updated_at)
            fields = apply(release, created, newest)
            if newest:
                release.updated_at = occurred
            s.add(
                ReleaseDecisionRow(
                    event_id=event_id, release_id=source.release_id, occurred_at=occurred, **fields
                )
            )
            audit.record(
                s,
                f"release.{fields['kind']}",
                f"release:{source.release_id}",
                detail=f"event {event_id}: {release.state} at weight {release.current_weight}",
                actor=source.producer,
            )
            # Unique event_id: a replica that recorded it meanwhile makes this fail, and
            # the retry then finds the row and returns False.
            s.flush()
            return True

        try:
            recorded = self.db.write(work)
        except RejectedVersionError as exc:
            # Refused (dead-lettered): audited on its own, the decision's transaction is gone.
            method = source.method
            outcome, detail = exc.code.name, f"event {event_id}: {exc}"
            self.db.write(
                lambda s: audit.record(
                    s,
                    method,
                    f"release:{source.release_id}",
                    outcome=outcome,
                    detail=detail,
                    actor=source.producer,
                )
            )
            raise
        if recorded:
            log.info("release %s: recorded %s", source.release_id, event_id)
        return recorded

    # -- queries ---------------------------------------------------------------------

    def get(self, release_id: str) -> registry_pb2.Release:
        if not release_id:
            raise InvalidArgument("release_id is required")
        with self.db.read() as s:
            row = s.get(ReleaseRow, release_id)
            if row is None:
                raise NotFound(f"release {release_id!r} is not recorded")
            return convert.release(row, _history(s, release_id))

    def team(self, release_id: str) -> str:
        """The team whose adapter the release moves traffic to ("" when unknown)."""
        with self.db.read() as s:
            row = s.get(ReleaseRow, release_id)
            if row is None:
                return ""
            for version_id in (row.candidate_version_id, row.stable_version_id):
                team = s.scalar(
                    select(AdapterRow.team)
                    .join(VersionRow, VersionRow.adapter == AdapterRow.name)
                    .where(VersionRow.version_id == version_id)
                )
                if team:
                    return team
            return ""

    def list(
        self,
        alias: str = "",
        size: int = 0,
        token: str = "",
        teams: Collection[str] | None = None,
    ) -> registry_pb2.ListReleasesResponse:
        """Newest first. ``teams``: only releases of these teams' adapters (None: any)."""
        if alias:
            check_name("alias", alias)
        offset = decode_token(token)
        limit = page_size(size)
        with self.db.read() as s:
            query = select(ReleaseRow)
            if alias:
                query = query.where(ReleaseRow.alias == alias)
            if teams is not None:
                theirs = (
                    select(VersionRow.version_id)
                    .join(AdapterRow, AdapterRow.name == VersionRow.adapter)
                    .where(AdapterRow.team.in_(list(teams)))
                )
                query = query.where(ReleaseRow.candidate_version_id.in_(theirs))
            rows = s.scalars(
                query.order_by(ReleaseRow.started_at.desc(), ReleaseRow.release_id)
                .offset(offset)
                .limit(limit + 1)
            ).all()
            page = rows[:limit]
            return registry_pb2.ListReleasesResponse(
                releases=[convert.release(r, _history(s, r.release_id)) for r in page],
                next_page_token=encode_token(offset + limit) if len(rows) > limit else "",
            )


@dataclass(frozen=True)
class _Source:
    """What a history row needs to know of the event that caused it."""

    event_id: str
    release_id: str
    occurred: datetime
    producer: str
    method: str

    @classmethod
    def of(
        cls,
        event: events_pb2.ReleaseStarted | events_pb2.ReleasePromote | events_pb2.ReleaseRollback,
    ) -> _Source:
        return cls(
            event_id=event.meta.event_id,
            release_id=event.release_id,
            occurred=_occurred(event),
            producer=_producer(event),
            method="release." + type(event).__name__.removeprefix("Release").lower(),
        )


def _producer(
    event: events_pb2.ReleaseStarted | events_pb2.ReleasePromote | events_pb2.ReleaseRollback,
) -> str:
    """The audit actor of an event-driven change: no gRPC caller, the producer decided."""
    meta = event.meta
    return "/".join(p for p in (meta.producer_service, meta.producer_instance) if p) or "unknown"


def _occurred(
    event: events_pb2.ReleaseStarted
    | events_pb2.ReleasePromote
    | events_pb2.ReleaseRollback
    | events_pb2.RouteChanged,
) -> datetime:
    return convert.from_timestamp(event.meta.occurred_at)


def _history(s: Session, release_id: str) -> list[ReleaseDecisionRow]:
    return list(
        s.scalars(
            select(ReleaseDecisionRow)
            .where(ReleaseDecisionRow.release_id == release_id)
            .order_by(ReleaseDecisionRow.occurred_at, ReleaseDecisionRow.id)
        )
    )
