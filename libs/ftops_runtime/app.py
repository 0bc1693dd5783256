"""Process entry point shared by the services: logging, telemetry, signals, asyncio."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ftops_runtime.auth import startup_problems
from ftops_runtime.dev_only import dev_only_problems
from ftops_runtime.server import install_stop_signals
from ftops_runtime.settings import ServiceSettings
from ftops_runtime.telemetry import setup_telemetry
from ftops_runtime.tls import transport_problems

S = TypeVar("S", bound=ServiceSettings)


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    # Client libraries are chatty at INFO about every reconnect.
    logging.getLogger("nats").setLevel(logging.WARNING)


def run_service(
    service: str,
    settings_type: type[S],
    serve: Callable[[S, asyncio.Event], Awaitable[None]],
) -> None:
    """Load settings, refuse unsafe auth and transport settings, set up logging/telemetry, run
    ``serve`` until SIGTERM/SIGINT."""
    settings = settings_type()
    configure_logging(settings.log_level, service)
    problems = (
        startup_problems(settings) + transport_problems(settings) + dev_only_problems(settings)
    )
    if problems:
        for problem in problems:
            logging.getLogger(service).error("refusing to start: %s", problem)
        raise SystemExit(f"ftops-{service}: refusing to start: " + "; ".join(problems))
    setup_telemetry(service, settings.instance_id, settings.otlp_endpoint)

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await serve(settings, stop)

    asyncio.run(main())
