"""Wiring: event bus, registry channel, job manager and gRPC server, started and stopped
in the right order. ``__main__`` and the integration tests share it."""

from __future__ import annotations

import logging
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ftops.registry.v1 import registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2_grpc
from ftops_runtime import auth, client, tls
from ftops_runtime.bus import EventBus
from ftops_runtime.server import GrpcServer
from ftops_trainer.jobs import JobManager
from ftops_trainer.service import SERVICE_NAME, TrainerServicer
from ftops_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


class TrainerApp:
    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.bus = EventBus(
            settings.nats_url,
            service="trainer",
            instance=settings.instance_id,
            max_deliver=settings.event_max_deliver,
            nak_delay_s=settings.event_nak_delay_s,
            stream_replicas=settings.event_stream_replicas,
            namespace=settings.namespace,
            connect_options=tls.nats_connect_options(settings),
        )
        self.registry_channel = client.channel(
            settings.registry_address,
            api_key=settings.registry_api_key,
            max_message_mb=settings.max_message_mb,
            tls=tls.load(settings).client,
        )
        # grpc ships no type stubs, so mypy cannot pick the aio overload by itself.
        self.registry = cast(
            "registry_pb2_grpc.RegistryServiceAsyncStub",
            registry_pb2_grpc.RegistryServiceStub(self.registry_channel),
        )
        self._registry_health = health_pb2_grpc.HealthStub(self.registry_channel)
        self.jobs = JobManager(settings, self.registry, self.bus)
        # Callers' keys are checked by the registry (cached for auth_cache_ttl_s).
        # Revocations applied at once (auth.key_changed); refusals audited by the registry.
        authenticate, self._auth_resolver = auth.registry_authenticator(
            settings, settings.registry_address, bus=self.bus, service="trainer"
        )
        self.server = GrpcServer(
            settings,
            service_names=[SERVICE_NAME],
            checks={"nats": self._nats_ok, "registry": self._registry_ok},
            authenticate=authenticate,
            denials=self._auth_resolver.denials,
        )
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            TrainerServicer(self.jobs), self.server.server
        )

    async def _nats_ok(self) -> bool:
        return self.bus.ready

    async def _registry_ok(self) -> bool:
        """The registry's own health answer: cheap, and SERVING only when its DB is up."""
        try:
            reply = await self._registry_health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> int:
        await self.bus.start()
        await self.jobs.start()
        return await self.server.start()

    async def stop(self) -> None:
        # Running jobs start handing back at once; the server drains its RPCs meanwhile.
        self.jobs.interrupt()
        await self.server.stop()
        await self.jobs.close()
        await self.registry_channel.close()
        await self._auth_resolver.close()
        await self.bus.close()
