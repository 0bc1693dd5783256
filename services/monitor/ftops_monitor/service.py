"""Wires the monitor together: NATS consumers, the analysis loop and the gRPC server."""

from __future__ import annotations

import asyncio
import logging

from nats.js.api import DeliverPolicy

from ftops.monitor.v1 import monitor_pb2_grpc
from ftops_monitor.monitor import Monitor
from ftops_monitor.servicer import MonitorServicer
from ftops_monitor.settings import MonitorSettings
from ftops_runtime.bus import EventBus
from ftops_runtime.events import (
    METRICS_REQUESTS,
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    RELEASE_STARTED,
)
from ftops_runtime.server import GrpcServer
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVICE_NAME = "ftops.monitor.v1.MonitorService"


class MonitorService:
    """A running monitor. ``start()`` then ``stop()``; tests use it directly."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.bus = EventBus(
            settings.nats_url,
            service="monitor",
            instance=settings.instance_id,
            max_deliver=settings.event_max_deliver,
            nak_delay_s=settings.event_nak_delay_s,
        )
        self.monitor = Monitor(self.bus, window_s=settings.window_s)
        self.server = GrpcServer(
            settings, service_names=[SERVICE_NAME], checks={"nats": self._nats_ok}
        )
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(
            MonitorServicer(self.monitor), self.server.server
        )
        self._loop: asyncio.Task[None] | None = None

    async def _nats_ok(self) -> bool:
        return self.bus.ready

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> int:
        self.bus.subscribe(
            METRICS_REQUESTS,
            self.settings.metrics_durable,
            self.monitor.on_metrics,
            deliver_policy=DeliverPolicy.NEW,
        )
        # Release state is rebuilt at every start by replaying the release history into a
        # per-instance consumer (one per subject: a consumer has one filter subject).
        prefix = f"monitor-{self.settings.instance_id}"
        inactive = self.settings.release_consumer_inactive_s
        for subject, handler, suffix in (
            (RELEASE_STARTED, self.monitor.on_started, "started"),
            (RELEASE_PROMOTE, self.monitor.on_promote, "promote"),
            (RELEASE_ROLLBACK, self.monitor.on_rollback, "rollback"),
        ):
            self.bus.subscribe(
                subject,
                f"{prefix}-{suffix}",
                handler,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold_s=inactive,
            )
        await self.bus.start()
        self._loop = asyncio.create_task(
            self.monitor.run(self.settings.analysis_interval_s), name="release-analysis"
        )
        return await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
        if self._loop is not None:
            await cancel_and_wait([self._loop])
        await self.bus.close()


async def serve(settings: MonitorSettings, stop: asyncio.Event) -> None:
    service = MonitorService(settings)
    await service.start()
    log.info("monitor serving on %s", service.address)
    await stop.wait()
    await service.stop()
