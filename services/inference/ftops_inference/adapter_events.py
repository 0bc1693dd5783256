"""adapter.ready in, adapter.loaded / adapter.load_failed out; adapter.retired in, the
version unloaded (once no in-flight request uses it).

Every replica consumes every adapter.ready (a durable per replica), so each one loads the
version and says so; the gateway routes only to replicas that announced it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js.api import DeliverPolicy

from ftops.events.v1 import events_pb2
from ftops_inference.core import InferenceCore
from ftops_inference.loader import AdapterRecord
from ftops_runtime import events
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.errors import FtopsError, Unavailable

log = logging.getLogger(__name__)

SERVICE = "inference"


class AdapterEvents:
    def __init__(
        self,
        bus: EventBus,
        core: InferenceCore,
        *,
        instance_id: str,
        endpoint: str,
        base_fingerprint: str,
        max_deliver: int,
    ) -> None:
        self._bus = bus
        self._core = core
        self._instance = instance_id
        self._endpoint = endpoint
        self._fingerprint = base_fingerprint
        self._max_deliver = max_deliver

    def subscribe(self) -> None:
        self._bus.subscribe(
            events.ADAPTER_READY,
            f"inference-{self._instance}",
            self.on_adapter_ready,
            # Loads also happen on demand, so a new replica needs no backlog replay.
            deliver_policy=DeliverPolicy.NEW,
            ack_wait_s=120,
            inactive_threshold_s=3600,
        )
        self._bus.subscribe(
            events.ADAPTER_RETIRED,
            f"inference-retired-{self._instance}",
            self.on_adapter_retired,
            # A replica started after a retirement never loaded that version.
            deliver_policy=DeliverPolicy.NEW,
            ack_wait_s=120,
            inactive_threshold_s=3600,
        )

    async def on_adapter_retired(
        self, event: events_pb2.AdapterRetired, delivery: Delivery
    ) -> None:
        # Idempotent: a version not held here (or unloaded already) needs nothing.
        heartbeat = asyncio.create_task(_keep_alive(delivery), name="ack-heartbeat")
        try:
            if await self._core.retire(event.version_id):
                log.info("retired adapter version %s (%s)", event.version_id, event.reason)
        finally:
            heartbeat.cancel()

    async def on_adapter_ready(self, event: events_pb2.AdapterReady, delivery: Delivery) -> None:
        if event.base_model_fingerprint and event.base_model_fingerprint != self._fingerprint:
            log.info(
                "ignoring adapter.ready for %s: base %s is served by another pool",
                event.version_id,
                event.base_model_fingerprint[:12],
            )
            return
        # Idempotent: a redelivered or repeated event re-announces without reloading.
        heartbeat = asyncio.create_task(_keep_alive(delivery), name="ack-heartbeat")
        try:
            result = await self._core.load(event.version_id, announce=False, background=True)
        except Unavailable as exc:
            if delivery.num_delivered < self._max_deliver:
                raise  # the registry may come back: let the bus redeliver
            await self.announce_failed(event.version_id, event.adapter, str(exc))
            return
        except FtopsError as exc:
            await self.announce_failed(event.version_id, event.adapter, str(exc))
            return
        finally:
            heartbeat.cancel()
        await self.announce_loaded(result.record)

    async def announce_loaded(self, record: AdapterRecord) -> None:
        await self._bus.publish(
            events.ADAPTER_LOADED,
            events_pb2.AdapterLoaded(
                meta=events.new_meta(SERVICE, self._instance),
                version_id=record.version_id,
                adapter=record.adapter,
                replica_id=self._instance,
                endpoint=self._endpoint,
                load_seconds=record.load_seconds,
            ),
        )

    async def announce_failed(self, version_id: str, adapter: str, reason: str) -> None:
        log.warning("adapter.load_failed %s: %s", version_id, reason)
        await self._bus.publish(
            events.ADAPTER_LOAD_FAILED,
            events_pb2.AdapterLoadFailed(
                meta=events.new_meta(SERVICE, self._instance),
                version_id=version_id,
                adapter=adapter,
                replica_id=self._instance,
                reason=reason,
            ),
        )


async def _keep_alive(delivery: Delivery, every_s: float = 15.0) -> None:
    """A big adapter may take longer than the ack deadline to download and load."""
    while True:
        await asyncio.sleep(every_s)
        with contextlib.suppress(Exception):
            await delivery.in_progress()
