"""Shutdown must not hang on a task that ignores its cancellation."""

from __future__ import annotations

import asyncio
import time

from ftops_runtime.tasks import cancel_and_wait


async def test_cancels_cooperative_tasks() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    await cancel_and_wait([task, None])
    assert task.cancelled()


async def test_bounded_wait_for_a_task_that_swallows_cancellation() -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue  # what a racing asyncio.wait_for does on 3.11

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await cancel_and_wait([task], timeout=0.3)
    assert time.monotonic() - started < 2
    assert not task.done()
    stop.set()
    await task
