"""Refused calls (UNAUTHENTICATED, PERMISSION_DENIED) on their way to the one audit log,
the registry's ``ListAudit``.

Recording a refusal is a dictionary update on the request path: it never waits on
anything. A background task flushes every ``interval_s`` one entry per source, key id,
method, code, team and reason, with how many times it happened, so a flood of
unauthenticated calls becomes a handful of entries and none is dropped (past
``max_distinct`` different entries in one interval, the rest are counted in one entry per
method and code). A failed flush keeps its entries for the next one.

The registry flushes into its database; every other service publishes ``audit.denied``
(``bus_flush``), which the registry writes. Only the id part of a key is ever recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from ftops.events.v1 import events_pb2
from ftops_runtime.errors import FtopsError
from ftops_runtime.events import AUDIT_DENIED, new_meta
from ftops_runtime.tasks import cancel_and_wait

if TYPE_CHECKING:
    from ftops_runtime.bus import EventBus

log = logging.getLogger(__name__)

DENIAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
MAX_REASON = 500
# Only the public id of whatever looks like an ftops key, never anything after it.
_KEY_ID_RE = re.compile(r"^ftk_([0-9a-f]{16})_")
# Attributes set on a refusal's exception: already audited (the registry's servicer writes
# its own refusals with their resource), and the team whose resource was refused.
_AUDITED = "_ftops_audited"
_TEAM = "_ftops_team"

Flush = Callable[[list[events_pb2.AccessDenied]], Awaitable[None]]


def key_from_metadata(md: Mapping[str, str]) -> str:
    """The API key a call presents (``authorization: Bearer``, ``x-ftops-key`` or
    ``x-api-key``), or ""."""
    auth = md.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return (md.get("x-ftops-key") or md.get("x-api-key") or "").strip()


def key_id_of(key: str) -> str:
    """The id part of a presented key ("" when it is no ftops key)."""
    match = _KEY_ID_RE.match(key.strip())
    return match.group(1) if match else ""


def source_of(peer: str) -> str:
    """A gRPC peer ("ipv4:10.0.0.7:51234", "ipv6:[::1]:5000") or an HTTP remote without
    its port: one source per host, whatever connection it used."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.partition(":")[2].rpartition(":")[0].strip("[]")
    return peer


def tag(exc: BaseException, *, team: str) -> None:
    """Remember which team's resource a PERMISSION_DENIED concerned."""
    setattr(exc, _TEAM, team)


def mark_audited(exc: BaseException) -> None:
    """This refusal is in the audit log already: the runtime must not record it again."""
    setattr(exc, _AUDITED, True)


def is_denial(exc: BaseException) -> bool:
    return isinstance(exc, FtopsError) and exc.code in DENIAL_CODES


@dataclass(frozen=True)
class _Key:
    method: str
    key_id: str
    source: str
    code: str
    team: str
    reason: str


@dataclass
class _Tally:
    count: int
    first_at: datetime
    last_at: datetime

    def merge(self, other: _Tally) -> None:
        self.count += other.count
        self.first_at = min(self.first_at, other.first_at)
        self.last_at = max(self.last_at, other.last_at)


class DenialRecorder:
    """Collects one service's refusals; flushes them every ``interval_s`` through
    ``flush`` (set now or later with ``bind``). The flush task starts with the first
    refusal recorded inside an event loop; ``close()`` flushes what is left."""

    def __init__(
        self,
        service: str,
        flush: Flush | None = None,
        *,
        interval_s: float = 1.0,
        max_distinct: int = 1000,
    ) -> None:
        self.service = service
        self._flush = flush
        self._interval = interval_s
        self._max_distinct = max_distinct
        self._pending: dict[_Key, _Tally] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def bind(self, flush: Flush) -> None:
        self._flush = flush

    def record(
        self,
        *,
        method: str,
        code: grpc.StatusCode,
        reason: str,
        key_id: str = "",
        source: str = "",
        team: str = "",
    ) -> None:
        """Count one refusal. Never raises, never waits."""
        now = datetime.now(UTC)
        key = _Key(method[:64], key_id, source[:100], code.name, team, reason[:MAX_REASON])
        self._add(key, _Tally(1, now, now))
        self._ensure_task()

    def record_exception(
        self, exc: BaseException, *, method: str, key_id: str = "", source: str = ""
    ) -> bool:
        """Record ``exc`` if it is a refusal nobody audited yet; True if it was one."""
        if not is_denial(exc) or getattr(exc, _AUDITED, False):
            return False
        assert isinstance(exc, FtopsError)
        self.record(
            method=method,
            code=exc.code,
            reason=str(exc),
            key_id=key_id,
            source=source,
            team=str(getattr(exc, _TEAM, "")),
        )
        mark_audited(exc)
        return True

    @property
    def pending(self) -> int:
        """Refusals recorded and not flushed yet."""
        return sum(t.count for t in self._pending.values())

    def _add(self, key: _Key, tally: _Tally) -> None:
        known = self._pending.get(key)
        if known is not None:
            known.merge(tally)
            return
        if len(self._pending) >= self._max_distinct:
            # Too many different entries (keys or sources spread to flood the log): count
            # the rest under one entry per method and code rather than drop them.
            key = _Key(key.method, "*", "*", key.code, "", "many different refusals")
            known = self._pending.get(key)
            if known is not None:
                known.merge(tally)
                return
        self._pending[key] = tally

    def _ensure_task(self) -> None:
        if self._task is not None or self._closed or self._flush is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside a loop (a unit test): flushed by an explicit flush()
        self._task = loop.create_task(self._loop(), name=f"{self.service}-denials")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> int:
        """Hand what is pending to ``flush``; on failure keep it for the next time.
        Returns how many refusals were flushed."""
        if not self._pending or self._flush is None:
            return 0
        batch, self._pending = self._pending, {}
        try:
            await self._flush([self._entry(k, t) for k, t in batch.items()])
        except Exception as exc:
            log.warning("could not audit %d refusals yet (kept): %r", len(batch), exc)
            for key, tally in batch.items():
                self._add(key, tally)
            return 0
        return sum(t.count for t in batch.values())

    def _entry(self, key: _Key, tally: _Tally) -> events_pb2.AccessDenied:
        entry = events_pb2.AccessDenied(
            service=self.service,
            method=key.method,
            key_id=key.key_id,
            source=key.source,
            code=key.code,
            team=key.team,
            reason=key.reason,
            count=tally.count,
            first_at=_timestamp(tally.first_at),
            last_at=_timestamp(tally.last_at),
        )
        return entry

    async def close(self) -> None:
        """Stop the flush task and flush what is left (once, briefly)."""
        self._closed = True
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=5)
        if self._pending:
            log.warning("%d refusals could not be audited before stopping", self.pending)


def bus_flush(bus: EventBus, *, service: str, instance: str) -> Flush:
    """Publish a batch as ``audit.denied`` (for every service but the registry)."""

    async def publish(entries: list[events_pb2.AccessDenied]) -> None:
        batch = events_pb2.AccessDeniedBatch(meta=new_meta(service, instance), denials=entries)
        await bus.publish(AUDIT_DENIED, batch, timeout=2.0)

    return publish


def _timestamp(at: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts
