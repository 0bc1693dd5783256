"""``ftops-registry``: serve the registry until SIGTERM."""

from __future__ import annotations

import asyncio

from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime.app import run_service


async def serve(settings: RegistrySettings, stop: asyncio.Event) -> None:
    app = RegistryApp(settings)
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()


def main() -> None:
    run_service("registry", RegistrySettings, serve)


if __name__ == "__main__":
    main()
