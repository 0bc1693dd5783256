"""``ftops-trainer``: the training service process."""

from __future__ import annotations

import asyncio

from ftops_runtime.app import run_service
from ftops_runtime.heap import freeze_startup_heap
from ftops_trainer.app import TrainerApp
from ftops_trainer.settings import TrainerSettings


async def serve(settings: TrainerSettings, stop: asyncio.Event) -> None:
    app = TrainerApp(settings)
    # Before serving: the one collection it takes then pauses no request.
    freeze_startup_heap()
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()


def main() -> None:
    run_service("trainer", TrainerSettings, serve)


if __name__ == "__main__":
    main()
