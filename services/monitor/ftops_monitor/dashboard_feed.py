"""The dashboard's recent-events list: release, alert and adapter events summarised in a
line each, newest last, bounded. Idempotent on the event id (redelivery is normal) and
ordered by when the event happened (events come through several consumers)."""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from ftops.events.v1 import events_pb2
from ftops_runtime.events import (
    ADAPTER_LOAD_FAILED,
    ADAPTER_LOADED,
    ADAPTER_READY,
    ADAPTER_REJECTED,
    ADAPTER_RETIRED,
    MONITOR_ALERT,
    RELEASE_PAUSED,
    RELEASE_PROMOTE,
    RELEASE_RESUMED,
    RELEASE_ROLLBACK,
    RELEASE_STARTED,
)

RELEASE_SUBJECTS = (
    RELEASE_STARTED,
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    RELEASE_PAUSED,
    RELEASE_RESUMED,
)
ADAPTER_SUBJECTS = (
    ADAPTER_READY,
    ADAPTER_REJECTED,
    ADAPTER_LOADED,
    ADAPTER_LOAD_FAILED,
    ADAPTER_RETIRED,
)
FEED_SUBJECTS = (*RELEASE_SUBJECTS, MONITOR_ALERT, *ADAPTER_SUBJECTS)
STRATEGIES = {
    events_pb2.RELEASE_STRATEGY_BLUE_GREEN: "blue_green",
    events_pb2.RELEASE_STRATEGY_SHADOW: "shadow",
}


@dataclass(frozen=True)
class FeedItem:
    event_id: str
    at: float
    subject: str
    alias: str
    release_id: str
    version_id: str
    text: str
    # Severity for the page's colours: info, good, warn, bad.
    level: str = "info"
    figures: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "at": round(self.at, 3),
            "subject": self.subject,
            "alias": self.alias,
            "release_id": self.release_id,
            "version_id": self.version_id,
            "text": self.text,
            "level": self.level,
            "figures": figures_json(self.figures),
        }


def finite(value: float, digits: int = 6) -> float | None:
    """JSON has no infinity or NaN (a browser's JSON.parse refuses the whole message):
    a test statistic that diverged is shown as missing."""
    return round(value, digits) if math.isfinite(value) else None


def figures_json(figures: dict[str, float]) -> dict[str, float | None]:
    return {k: finite(v) for k, v in sorted(figures.items())}


def _at(event: Any) -> float:
    ts = event.meta.occurred_at
    return float(ts.seconds + ts.nanos / 1e9)


def _who(actor: str) -> str:
    return f" by {actor}" if actor else ""


def summarise(subject: str, event: Message) -> FeedItem:
    """One line about ``event`` (the payload type of ``subject``)."""
    e: Any = event
    meta = (e.meta.event_id, _at(e), subject)
    if isinstance(event, events_pb2.ReleaseStarted):
        strategy = STRATEGIES.get(event.strategy, "canary")
        steps = "/".join(str(s) for s in event.steps) or str(event.current_weight)
        return FeedItem(
            *meta,
            event.alias,
            event.release_id,
            event.candidate_version_id,
            f"{strategy} started{_who(event.actor)}: {event.stable_version_id or '-'} -> "
            f"{event.candidate_version_id}, steps {steps}%",
        )
    if isinstance(event, events_pb2.ReleasePromote):
        what = "final promotion" if event.final else f"step {event.step_index} at {event.weight}%"
        how = "manual " if event.manual else ""
        return FeedItem(
            *meta,
            event.alias,
            event.release_id,
            event.candidate_version_id,
            f"{how}promote, {what}: {event.reason}",
            "good",
            dict(event.figures),
        )
    if isinstance(event, events_pb2.ReleaseRollback):
        how = "manual " if event.manual else ""
        return FeedItem(
            *meta,
            event.alias,
            event.release_id,
            event.candidate_version_id,
            f"{how}rollback to {event.stable_version_id or '-'}: {event.reason}",
            "bad",
            dict(event.figures),
        )
    if isinstance(event, events_pb2.ReleasePaused | events_pb2.ReleaseResumed):
        what = "paused" if isinstance(event, events_pb2.ReleasePaused) else "resumed"
        reason = f": {event.reason}" if event.reason else ""
        return FeedItem(
            *meta,
            event.alias,
            event.release_id,
            "",
            f"{what}{_who(event.actor)}{reason}",
            "warn" if what == "paused" else "info",
        )
    if isinstance(event, events_pb2.Alert):
        return FeedItem(
            *meta,
            event.alias,
            "",
            event.version_id,
            f"alert {event.rule} {event.state} on {event.version_id}: {event.message}",
            "bad" if event.state == "firing" else "good",
            {"value": event.value, "threshold": event.threshold},
        )
    return FeedItem(*meta, "", "", e.version_id, _adapter_text(subject, event), _level(event))


def _adapter_text(subject: str, event: Message) -> str:
    if isinstance(event, events_pb2.AdapterReady):
        return f"{event.adapter} v{event.version_number} ready ({event.version_id})"
    if isinstance(event, events_pb2.AdapterRejected):
        reasons = "; ".join(event.reasons) or "no reason given"
        return f"{event.adapter} v{event.version_number} rejected: {reasons}"
    if isinstance(event, events_pb2.AdapterLoaded):
        return f"{event.version_id} loaded on {event.replica_id} in {event.load_seconds:.2f} s"
    if isinstance(event, events_pb2.AdapterLoadFailed):
        return f"{event.version_id} failed to load on {event.replica_id}: {event.reason}"
    if isinstance(event, events_pb2.AdapterRetired):
        return f"{event.version_id} retired: {event.reason}"
    return subject


def _level(event: Message) -> str:
    if isinstance(event, events_pb2.AdapterRejected | events_pb2.AdapterLoadFailed):
        return "bad"
    return "info"


class EventFeed:
    """The newest ``limit`` events by occurrence time, and the latest decisions (promote,
    rollback) of the newest ``release_limit`` releases."""

    def __init__(
        self, limit: int = 200, *, decisions_per_release: int = 10, release_limit: int = 200
    ) -> None:
        self._items: list[FeedItem] = []  # sorted by ``at``
        self._limit = limit
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._decisions: OrderedDict[str, deque[FeedItem]] = OrderedDict()
        self._decisions_per_release = decisions_per_release
        self._release_limit = release_limit
        # Changes with every event listed: a page that polls is sent the list only then.
        self.revision = 0

    def add(self, item: FeedItem) -> bool:
        """False for an event already listed (a redelivery)."""
        if item.event_id:
            if item.event_id in self._seen:
                return False
            self._seen[item.event_id] = None
            # Long past redelivery by then.
            if len(self._seen) > self._limit * 10:
                self._seen.popitem(last=False)
        bisect.insort(self._items, item, key=lambda i: i.at)
        if len(self._items) > self._limit:
            del self._items[0]
        if item.subject in (RELEASE_PROMOTE, RELEASE_ROLLBACK) and item.release_id:
            self._add_decision(item)
        self.revision += 1
        return True

    def _add_decision(self, item: FeedItem) -> None:
        ring = self._decisions.get(item.release_id)
        if ring is None:
            ring = self._decisions[item.release_id] = deque(maxlen=self._decisions_per_release)
            if len(self._decisions) > self._release_limit:
                self._decisions.popitem(last=False)
        ring.append(item)

    def items(self) -> list[FeedItem]:
        return list(self._items)

    def decisions(self, release_id: str) -> list[FeedItem]:
        return sorted(self._decisions.get(release_id, ()), key=lambda i: i.at)
