"""Buffers per-request results and publishes them as ``metrics.requests`` batches.

The request path only appends to a bounded in-memory queue; a background task publishes
every ``flush_s`` or as soon as ``batch_max`` results wait. While NATS is down the queue
keeps the newest ``queue_max`` results and counts the dropped oldest ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from ftops.events.v1 import events_pb2
from ftops_runtime.bus import EventBus
from ftops_runtime.events import METRICS_REQUESTS, new_meta
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class MetricsReporter:
    def __init__(
        self,
        bus: EventBus,
        *,
        flush_s: float = 0.5,
        batch_max: int = 64,
        queue_max: int = 10_000,
    ) -> None:
        self._bus = bus
        self._flush_s = flush_s
        self._batch_max = batch_max
        self._queue: deque[events_pb2.RequestResult] = deque()
        self._queue_max = queue_max
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.published = 0

    def record(self, result: events_pb2.RequestResult) -> None:
        """Never blocks and never raises: reporting must not slow or fail a request."""
        if len(self._queue) >= self._queue_max:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(result)
        if len(self._queue) >= self._batch_max:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="metrics-flush")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        # Best effort: what is still queued goes out if NATS is there.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 2.0)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                log.debug("metrics flush failed: %s", exc)

    async def flush(self) -> None:
        while self._queue and self._bus.ready:
            batch = [self._queue.popleft() for _ in range(min(self._batch_max, len(self._queue)))]
            event = events_pb2.RequestResultBatch(
                meta=new_meta(self._bus.service, self._bus.instance), results=batch
            )
            try:
                await self._bus.publish(METRICS_REQUESTS, event, timeout=2.0)
            except Exception:
                self._requeue(batch)
                raise
            self.published += len(batch)

    def _requeue(self, batch: list[events_pb2.RequestResult]) -> None:
        """Put a failed batch back in front, dropping its oldest results if full."""
        room = self._queue_max - len(self._queue)
        keep = batch[-room:] if room > 0 else []
        self.dropped += len(batch) - len(keep)
        self._queue.extendleft(reversed(keep))
