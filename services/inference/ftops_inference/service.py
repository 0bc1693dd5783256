"""Wires the inference service together: model, registry client, NATS, gRPC server."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import cast

from ftops.inference.v1 import inference_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_inference.adapter_events import AdapterEvents
from ftops_inference.backend import Backend, HFPeftBackend
from ftops_inference.core import InferenceCore
from ftops_inference.loader import AdapterLoader
from ftops_inference.servicer import InferenceServicer
from ftops_inference.settings import InferenceSettings
from ftops_runtime import client, hashing
from ftops_runtime.bus import EventBus
from ftops_runtime.retry import retry_forever
from ftops_runtime.server import GrpcServer
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVICE_NAME = "ftops.inference.v1.InferenceService"


class InferenceService:
    """A running inference replica. ``start()`` returns once the port is bound; the model
    loads in the background while health says NOT_SERVING."""

    def __init__(self, settings: InferenceSettings, backend: Backend | None = None) -> None:
        if not settings.base_model_path:
            raise ValueError("FTOPS_BASE_MODEL_PATH is not set")
        self.settings = settings
        self.model_dir = Path(settings.base_model_path).resolve()
        self.backend: Backend = backend or HFPeftBackend(self.model_dir, device=settings.device)
        self.bus = EventBus(
            settings.nats_url,
            service="inference",
            instance=settings.instance_id,
            max_deliver=settings.event_max_deliver,
            nak_delay_s=settings.event_nak_delay_s,
        )
        self.core = InferenceCore(
            self.backend,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_new_tokens_limit=settings.max_new_tokens_limit,
            default_max_tokens=settings.default_max_tokens,
            max_concurrent_requests=settings.max_concurrent_requests,
        )
        self.server = GrpcServer(
            settings,
            service_names=[SERVICE_NAME],
            checks={
                "nats": self._nats_ok,
                "model": self._model_ok,
                "registry": self._registry_ok,
            },
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.core, base_model=settings.base_model_name), self.server.server
        )
        self._registry_channel = client.channel(settings.registry_address)
        self.registry = cast(
            "registry_pb2_grpc.RegistryServiceAsyncStub",
            registry_pb2_grpc.RegistryServiceStub(self._registry_channel),
        )
        self.base_registered = False
        self.base_fingerprint = ""
        self.events: AdapterEvents | None = None
        self._startup: asyncio.Task[None] | None = None

    async def _nats_ok(self) -> bool:
        return self.bus.ready

    async def _model_ok(self) -> bool:
        return self.backend.ready and self.core.loader is not None

    async def _registry_ok(self) -> bool:
        return self.base_registered

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def endpoint(self) -> str:
        if self.settings.advertise_address:
            return self.settings.advertise_address
        if self.settings.grpc_host in ("0.0.0.0", "::", "[::]"):
            # A wildcard bind is not an address others can dial; the host name is.
            return f"{socket.gethostname()}:{self.server.port}"
        return self.server.address

    async def start(self) -> int:
        port = await self.server.start()
        await self.bus.start()
        self._startup = asyncio.create_task(self._start_model(), name="load-base-model")
        return port

    async def wait_ready(self) -> None:
        """Until the model is loaded, registered, and adapter.ready is consumed."""
        assert self._startup is not None
        await asyncio.shield(self._startup)
        await self.bus.wait_ready()

    async def _start_model(self) -> None:
        self.base_fingerprint = await asyncio.to_thread(hashing.model_fingerprint, self.model_dir)
        await self.backend.start()
        self.core.loader = AdapterLoader(
            registry=self.registry,
            backend=self.backend,
            cache_dir=Path(self.settings.adapter_cache_dir),
            base_fingerprint=self.base_fingerprint,
            registry_timeout_s=self.settings.registry_timeout_s,
        )
        self.events = AdapterEvents(
            self.bus,
            self.core,
            instance_id=self.settings.instance_id,
            endpoint=self.endpoint,
            base_fingerprint=self.base_fingerprint,
            max_deliver=self.settings.event_max_deliver,
        )
        self.core.on_loaded = self.events.announce_loaded
        log.info("base model %s ready (%s)", self.model_dir, self.base_fingerprint[:12])
        await retry_forever("register the base model in the registry", self._register_base)
        self.base_registered = True
        self.events.subscribe()

    async def _register_base(self) -> None:
        await self.registry.RegisterBaseModel(
            registry_pb2.RegisterBaseModelRequest(
                name=self.settings.base_model_name,
                fingerprint=self.base_fingerprint,
                uri=str(self.model_dir),
            ),
            timeout=self.settings.registry_timeout_s,
        )
        log.info("registered base model %s", self.settings.base_model_name)

    async def stop(self) -> None:
        await self.server.stop()
        if self._startup is not None and not self._startup.done():
            await cancel_and_wait([self._startup])
        await self.bus.close()
        await self._registry_channel.close()
        await self.backend.close()


async def serve(settings: InferenceSettings, stop: asyncio.Event) -> None:
    service = InferenceService(settings)
    await service.start()
    log.info("inference listening on %s (advertised as %s)", service.address, service.endpoint)
    await stop.wait()
    await service.stop()
