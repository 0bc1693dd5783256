"""Exponential backoff for reconnect loops: a dependency that is down at start is retried,
never crashed on."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def backoff_delays(
    initial: float = 0.2, maximum: float = 10.0, factor: float = 2.0
) -> Iterator[float]:
    """Yield delays forever with full jitter (avoids reconnect storms across replicas)."""
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(maximum, delay * factor)


async def retry_forever(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    initial: float = 0.2,
    maximum: float = 10.0,
) -> T:
    """Call ``attempt`` until it succeeds, sleeping with backoff between failures."""
    delays = backoff_delays(initial, maximum)
    failures = 0
    while True:
        try:
            return await attempt()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            delay = next(delays)
            # Log the first failure loudly, then quietly: an outage should not flood logs.
            level = logging.WARNING if failures == 1 or failures % 20 == 0 else logging.DEBUG
            log.log(
                level, "%s failed (attempt %d): %s; retrying in %.1fs", what, failures, exc, delay
            )
            await asyncio.sleep(delay)
