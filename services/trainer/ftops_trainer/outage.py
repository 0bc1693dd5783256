"""Waiting out a registry outage at the end of a job.

A job that has trained has work worth keeping: when the registry (or its database) is
down as it uploads its artifacts, registers its version or writes its final record, the
trainer retries the call with backoff for up to ``registry_outage_s`` instead of handing
the job back to the queue. Meanwhile the job's heartbeats keep its place on the queue, and
no delivery is spent: a redelivery per failed try would use up ``event_max_deliver`` in
seconds and dead-letter the job. The calls are safe to repeat: artifacts are
content-addressed, a registration carries the job id as its idempotency key, and a job
record write is compare-and-set.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from ftops_runtime.errors import Unavailable
from ftops_runtime.retry import backoff_delays

T = TypeVar("T")
log = logging.getLogger(__name__)

# The registry down, or its database (the registry answers UNAVAILABLE then), or a call
# that timed out on the way.
OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in OUTAGE_CODES
    return isinstance(exc, Unavailable)


async def through_registry_outage(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    window_s: float,
    stop: threading.Event | None = None,
    initial_delay_s: float = 0.5,
) -> T:
    """``call()``, retried while it fails for an outage, for up to ``window_s`` after the
    first failure; then (or once ``stop`` is set) its last error is raised."""
    deadline: float | None = None
    delays = backoff_delays(initial=initial_delay_s, maximum=max(initial_delay_s, 5.0))
    while True:
        try:
            result = await call()
        except Exception as exc:
            if not _transient(exc):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + window_s
                log.warning(
                    "%s: the registry is unavailable (%s); retrying for up to %.0f s",
                    what,
                    exc,
                    window_s,
                )
            if now >= deadline or (stop is not None and stop.is_set()):
                raise
            await asyncio.sleep(min(next(delays), max(0.0, deadline - now)))
            continue
        if deadline is not None:
            log.info("%s: done once the registry was back", what)
        return result
