"""Stopping background tasks without hanging a shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[object] | None], timeout: float = 5.0
) -> None:
    """Cancel the tasks and wait for them, at most ``timeout`` seconds.

    On Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that arrives just as its
    inner awaitable completes, so a loop built on it may never see the cancel; awaiting
    such a task directly would hang shutdown forever. Loops should also check a stop flag.
    """
    pending = [t for t in tasks if t is not None and not t.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return
    _, still_running = await asyncio.wait(pending, timeout=timeout)
    for task in still_running:
        log.warning("task %s did not stop within %.0fs of cancellation", task.get_name(), timeout)
