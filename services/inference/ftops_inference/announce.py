"""Replica announcements on ``inference.replica.<id>``: on start, on every change of the
loaded/cached versions, by heartbeat, on drain and on stop. Gateways keep the last one of
each replica (the stream keeps it too) to know who serves what. Announcing is best effort:
a NATS hiccup is logged and retried by the next heartbeat, never felt by requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ftops.events.v1 import events_pb2
from ftops_runtime import events
from ftops_runtime.bus import EventBus
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVICE = "inference"


class Announcer:
    def __init__(
        self,
        bus: EventBus,
        snapshot: Callable[[], events_pb2.ReplicaAnnounce],
        *,
        replica_id: str,
        interval_s: float,
    ) -> None:
        self._bus = bus
        self._snapshot = snapshot
        self._replica = replica_id
        self._subject = events.replica_subject(replica_id)
        self.interval_s = interval_s
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_sent: tuple[tuple[str, ...], tuple[str, ...], bool] | None = None
        self.published = 0
        self.failures = 0
        self._stopped = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="replica-announce")

    def changed(self) -> None:
        """What the replica serves changed: announce soon (coalesced, off the caller)."""
        self._changed.set()

    async def stop(self) -> None:
        # The flag too: asyncio.wait_for (Python 3.11) can swallow the cancel as its wait
        # times out, and the loop would go on while a plain await of it hung the stop.
        self._stopped = True
        self._changed.set()
        await cancel_and_wait([self._task])
        self._task = None

    async def announce(self, reason: str) -> bool:
        try:
            event = self._snapshot()
            event.meta.CopyFrom(events.new_meta(SERVICE, self._replica))
            event.reason = reason
            event.heartbeat_interval_s = self.interval_s
            await self._bus.publish(self._subject, event, timeout=2.0)
        except Exception as exc:
            self.failures += 1
            log.warning("replica announcement (%s) failed: %r", reason, exc)
            return False
        self.published += 1
        self._last_sent = (
            tuple(event.loaded_versions),
            tuple(event.cached_versions),
            event.serving,
        )
        return True

    async def _run(self) -> None:
        await self.announce("start")
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval_s
        while not self._stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(due - loop.time(), 0))
            if self._stopped:
                return
            if self._changed.is_set():
                self._changed.clear()
                if self._state_differs():
                    await self.announce("change")
                    due = loop.time() + self.interval_s
                    continue
            if loop.time() >= due:
                await self.announce("heartbeat")
                due = loop.time() + self.interval_s

    def _state_differs(self) -> bool:
        try:
            event = self._snapshot()
        except Exception:
            return True
        now = (tuple(event.loaded_versions), tuple(event.cached_versions), event.serving)
        return now != self._last_sent
