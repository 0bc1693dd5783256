"""The NATS consumer that turns route.changed (the gateway's state after each change it
applied) into release history.

One durable per subject, shared by every registry replica (work sharing: each event is
recorded by one replica; the unique event id covers redeliveries and races anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message

from ftops_registry.db import Database
from ftops_registry.releases import ReleaseHistory
from ftops_runtime import events
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.errors import Unavailable
from ftops_runtime.retry import backoff_delays

log = logging.getLogger(__name__)

DEFAULT_DURABLE = "registry"
E = TypeVar("E", bound=Message)


def subscribe_release_events(
    bus: EventBus, db: Database, releases: ReleaseHistory, *, durable: str = DEFAULT_DURABLE
) -> None:
    """Start recording release events (call once the database is migrated)."""
    _subscribe(bus, events.ROUTE_CHANGED, durable, db, releases.apply_route_changed)


def _subscribe(
    bus: EventBus, subject: str, durable: str, db: Database, apply: Callable[[E], bool]
) -> None:
    async def handle(event: E, delivery: Delivery) -> None:
        delays = backoff_delays(initial=0.5, maximum=5.0)
        while True:
            try:
                recorded = await db.run(apply, event)
                break
            except Unavailable as exc:
                # Hold on to the message while the database is down: an outage must not
                # burn the delivery attempts and dead-letter good events. Other errors
                # propagate (redelivery, then the dead-letter subject).
                log.warning("cannot record %s yet: %s", subject, exc)
                with contextlib.suppress(Exception):
                    await delivery.in_progress()
                await asyncio.sleep(next(delays))
        if not recorded:
            log.debug("%s %s was already recorded", subject, _event_id(event))

    # Durable names are per stream and a durable has one filter subject: one per subject.
    bus.subscribe(subject, f"{durable}-{subject}", handle)


def _event_id(event: Message) -> str:
    meta = getattr(event, "meta", None)
    return str(meta.event_id) if meta is not None else ""
