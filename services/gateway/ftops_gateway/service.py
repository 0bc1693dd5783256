"""Wires the gateway together: Redis, registry, inference pool, NATS and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace

import redis.asyncio as redis
from nats.js.api import DeliverPolicy

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2_grpc
from ftops.registry.v1 import registry_pb2_grpc
from ftops_gateway.alias_access import AliasAccess, GuardedGateway
from ftops_gateway.endpoints import EndpointPool
from ftops_gateway.forwarder import Forwarder
from ftops_gateway.metrics_reporter import MetricsReporter
from ftops_gateway.openai_http import OpenAIHttpServer
from ftops_gateway.rate_limit import Limit, RateLimiter, limiter_client, parse_team_limits
from ftops_gateway.release_history import ReleaseHistory
from ftops_gateway.releases import ReleaseManager
from ftops_gateway.retirement import Retirer
from ftops_gateway.route_cache import RouteCache
from ftops_gateway.route_store import RouteStore
from ftops_gateway.servicer import GatewayServicer
from ftops_gateway.settings import GatewaySettings
from ftops_gateway.shadow import ShadowMirror
from ftops_gateway.versions import VersionResolver
from ftops_runtime import auth, client, tls
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.events import (
    ADAPTER_LOADED,
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    REPLICA_ANNOUNCEMENTS,
)
from ftops_runtime.heap import freeze_startup_heap
from ftops_runtime.server import GrpcServer

log = logging.getLogger(__name__)

SERVICE_NAME = "ftops.gateway.v1.GatewayService"


class GatewayService:
    """A running gateway replica. ``start()`` then ``stop()``; tests use it directly."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        self.store = RouteStore(
            self.redis,
            dedupe_ttl_s=settings.event_dedupe_ttl_s,
            key_prefix=settings.installation().redis_prefix(),
        )
        self.routes = RouteCache(self.store, refresh_s=settings.route_refresh_s)
        self.bus = EventBus(
            settings.nats_url,
            service="gateway",
            instance=settings.instance_id,
            max_deliver=settings.event_max_deliver,
            nak_delay_s=settings.event_nak_delay_s,
            stream_replicas=settings.event_stream_replicas,
            namespace=settings.namespace,
            connect_options=tls.nats_connect_options(settings),
        )
        # The gateway's own key: the registry checks its reads like anyone else's.
        transport = tls.load(settings)
        self._registry_channel = client.channel(
            settings.registry_address, api_key=settings.registry_api_key, tls=transport.client
        )
        registry = registry_pb2_grpc.RegistryServiceStub(self._registry_channel)
        self.versions = VersionResolver(registry)
        inference_tls = transport.client
        if inference_tls is not None and settings.inference_tls_server_name:
            inference_tls = replace(inference_tls, server_name=settings.inference_tls_server_name)
        self._redis_reached = self._nats_reached = False
        self.pool = EndpointPool(settings.inference_endpoint_list(), tls=inference_tls)
        self.reporter = MetricsReporter(
            self.bus,
            flush_s=settings.metrics_flush_s,
            batch_max=settings.metrics_batch_max,
            queue_max=settings.metrics_queue_max,
        )
        forwarder = Forwarder(
            self.pool,
            api_key=settings.registry_api_key,
            transport=settings.inference_transport,
            base_of=self.versions.base_fingerprint,
            mirror_max_per_replica=settings.mirror_max_per_replica,
        )
        self.shadow = ShadowMirror(
            forwarder, self.reporter, max_in_flight=settings.shadow_max_in_flight
        )
        self.access = AliasAccess(
            self.routes,
            self.versions,
            enforce=auth.effective_mode(settings) is auth.AuthMode.enabled,
        )
        self.limiter = rate_limiter(settings)
        self.gateway = GuardedGateway(
            self.routes,
            self.versions,
            forwarder,
            self.reporter,
            shadow=self.shadow,
            access=self.access,
            limiter=self.limiter,
        )
        self.releases = ReleaseManager(
            self.store, self.routes, self.versions, self.bus, ReleaseHistory(registry)
        )
        self.retirer = Retirer(
            self.store,
            self.routes,
            self.bus,
            owner=settings.instance_id,
            interval_s=settings.retire_interval_s,
        )
        # Callers' keys are checked by the registry (cached for auth_cache_ttl_s); both
        # front ends share the hook, so a key works (or not) the same over HTTP.
        # Revocations applied at once (auth.key_changed); refusals audited by the registry.
        authenticate, self._auth_resolver = auth.registry_authenticator(
            settings, settings.registry_address, bus=self.bus, service="gateway"
        )
        self.server = GrpcServer(
            settings,
            service_names=[SERVICE_NAME],
            checks={"redis": self._redis_ok, "nats": self._nats_ok},
            authenticate=authenticate,
            denials=self._auth_resolver.denials,
        )
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            GatewayServicer(self.gateway, self.releases, self.access), self.server.server
        )
        self.http = OpenAIHttpServer(self.gateway, settings, authenticate=authenticate)

    # Once the gateway has reached Redis and NATS, an outage of either degrades it without
    # taking it out of the balancers' rotation: requests are still routed by the last known
    # table to the last known replicas (release commands answer UNAVAILABLE, results wait
    # in their buffer). Health reporting NOT_SERVING then would fail every request at once.
    async def _redis_ok(self) -> bool:
        try:
            ok = await self.store.ping()
        except Exception as exc:  # unreachable: the outage this check is about
            log.debug("redis ping failed: %r", exc)
            ok = False
        self._redis_reached = self._redis_reached or ok
        return ok or self._redis_reached

    async def _nats_ok(self) -> bool:
        ok = self.bus.ready
        self.pool.set_listening(ok)
        self._nats_reached = self._nats_reached or ok
        return ok or self._nats_reached

    async def _on_loaded(self, event: events_pb2.AdapterLoaded, delivery: Delivery) -> None:
        if event.endpoint:
            self.pool.mark_loaded(event.endpoint, event.version_id)

    async def _on_announce(self, event: events_pb2.ReplicaAnnounce, delivery: Delivery) -> None:
        self.pool.announce(event)

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> int:
        # Every replica needs every adapter.loaded (fan-out durable per instance).
        self.bus.subscribe(
            ADAPTER_LOADED,
            f"gateway-{self.settings.instance_id}",
            self._on_loaded,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold_s=self.settings.endpoint_inactive_s,
        )
        # The stream keeps each replica's last announcement: starting from those, this
        # replica learns every live inference replica at once.
        self.bus.subscribe(
            REPLICA_ANNOUNCEMENTS,
            f"gateway-replicas-{self.settings.instance_id}",
            self._on_announce,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold_s=self.settings.endpoint_inactive_s,
            ack_wait_s=5.0,
            batch=64,
        )
        # Decisions are applied once for all replicas (shared durables; Redis dedupes).
        # One durable per subject: a JetStream consumer has a single filter subject.
        durable = self.settings.releases_durable
        self.bus.subscribe(RELEASE_PROMOTE, f"{durable}-promote", self.releases.on_promote)
        self.bus.subscribe(RELEASE_ROLLBACK, f"{durable}-rollback", self.releases.on_rollback)
        await self.bus.start()
        await self.routes.start()
        await self.reporter.start()
        await self.retirer.start()
        port = await self.server.start()
        await self.http.start()
        return port

    async def stop(self) -> None:
        await self.http.stop()
        await self.server.stop()
        await self.retirer.close()
        await self.releases.close()
        await self.shadow.close()
        await self.reporter.close()
        await self.routes.close()
        await self.bus.close()
        await self.pool.close()
        await self._registry_channel.close()
        await self._auth_resolver.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        if self.limiter is not None:
            await self.limiter.close()


def rate_limiter(settings: GatewaySettings) -> RateLimiter | None:
    """The per-key limiter the settings ask for, or None (no limits configured)."""
    default = (
        Limit.of(settings.rate_limit_rps, settings.rate_limit_burst)
        if settings.rate_limit_rps > 0
        else None
    )
    teams = parse_team_limits(settings.rate_limit_teams)
    if default is None and not teams:
        return None
    client = limiter_client(settings.redis_url, settings.redis_timeout_s)
    return RateLimiter(client, default, teams, key_prefix=settings.installation().redis_prefix())


async def serve(settings: GatewaySettings, stop: asyncio.Event) -> None:
    service = GatewayService(settings)
    # Before serving: the one collection it takes then pauses no request.
    freeze_startup_heap()
    await service.start()
    log.info("gateway serving on %s", service.address)
    await stop.wait()
    await service.stop()
