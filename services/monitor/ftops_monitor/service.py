"""Wires the monitor together: NATS consumers, the analysis loop, the registry lookup of
evaluations, the gRPC server and the metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import uuid

from nats.js.api import DeliverPolicy
from opentelemetry import metrics
from prometheus_client import CollectorRegistry

from ftops.monitor.v1 import monitor_pb2_grpc
from ftops.registry.v1 import registry_pb2_grpc
from ftops_monitor.alerts import AlertRules
from ftops_monitor.dashboard import Dashboard
from ftops_monitor.dashboard_names import VersionNames, registry_names
from ftops_monitor.evaluation import registry_lookup
from ftops_monitor.exporter import MetricsServer, prometheus_registry, register_otel
from ftops_monitor.feedback import RequestIndex
from ftops_monitor.http_access import HttpAccess
from ftops_monitor.monitor import Monitor
from ftops_monitor.servicer import MonitorServicer
from ftops_monitor.settings import MonitorSettings
from ftops_monitor.visibility import TeamView
from ftops_runtime import auth, client, tls
from ftops_runtime.bus import EventBus
from ftops_runtime.events import (
    METRICS_FEEDBACK,
    METRICS_REQUESTS,
    ROUTE_CHANGED,
)
from ftops_runtime.heap import freeze_startup_heap
from ftops_runtime.server import GrpcServer
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVICE_NAME = "ftops.monitor.v1.MonitorService"
METRICS_PORT_FALLBACK = 0


def alert_rules(settings: MonitorSettings) -> AlertRules:
    return AlertRules(
        error_rate_above=settings.alert_error_rate,
        p99_latency_above_ms=settings.alert_latency_p99_ms,
        feedback_below=settings.alert_feedback_below,
        for_s=settings.alert_for_s,
        min_requests=settings.alert_min_requests,
        min_feedback=settings.alert_min_requests,
        release_held_for_s=settings.alert_release_held_for_s,
    )


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
            stream_replicas=settings.event_stream_replicas,
            namespace=settings.namespace,
            connect_options=tls.nats_connect_options(settings),
        )
        self._registry_channel = client.channel(
            settings.registry_address,
            api_key=settings.registry_api_key,
            tls=tls.load(settings).client,
        )
        registry = registry_pb2_grpc.RegistryServiceStub(self._registry_channel)
        self.monitor = Monitor(
            self.bus,
            window_s=settings.window_s,
            alert_rules=alert_rules(settings),
            evaluations=registry_lookup(registry, timeout_s=settings.registry_timeout_s),
            requests=RequestIndex(
                max_age_s=settings.feedback_max_age_s, max_items=settings.feedback_max_requests
            ),
        )
        # Callers' keys are checked by the registry (cached for auth_cache_ttl_s).
        # Revocations applied at once (auth.key_changed); refusals audited by the registry.
        authenticate, self._auth_resolver = auth.registry_authenticator(
            settings, settings.registry_address, bus=self.bus, service="monitor"
        )
        self.server = GrpcServer(
            settings,
            service_names=[SERVICE_NAME],
            checks={"nats": self._nats_ok},
            authenticate=authenticate,
            denials=self._auth_resolver.denials,
        )
        teams = auth.VersionTeams(registry, timeout_s=settings.registry_timeout_s)
        self.view = TeamView(self.monitor, teams)
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(
            MonitorServicer(self.monitor, self.view), self.server.server
        )
        # The HTTP endpoint checks keys as the gRPC server does, and audits its refusals
        # the same way.
        self.http_access = HttpAccess(authenticate, self._auth_resolver.denials)
        # HTTPS with the gRPC server's certificate when one is configured.
        server_tls = tls.load(settings).server
        self._http_tls = server_tls.ssl_context() if server_tls is not None else None
        self.metrics: MetricsServer | None = None
        self.dashboard = Dashboard(
            self.monitor,
            view=self.view,
            names=VersionNames(registry_names(registry, timeout_s=settings.registry_timeout_s)),
        )
        register_otel(self.monitor, metrics.get_meter("ftops.monitor"))
        self._loop: asyncio.Task[None] | None = None

    async def _nats_ok(self) -> bool:
        return self.bus.ready

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def metrics_port(self) -> int:
        return self.metrics.port if self.metrics is not None else -1

    def _metrics_server(self, registry: CollectorRegistry, port: int) -> MetricsServer:
        return MetricsServer(
            registry,
            self.settings.grpc_host,
            port,
            dashboard=self.dashboard,
            access=self.http_access,
            view=self.view,
            monitor=self.monitor,
            ssl_context=self._http_tls,
        )

    async def _start_metrics(self) -> None:
        port = self.settings.metrics_port
        if port < 0:
            return
        registry = prometheus_registry(self.monitor)
        self.metrics = self._metrics_server(registry, port)
        try:
            await self.metrics.start()
        except OSError as exc:
            if port == METRICS_PORT_FALLBACK:
                raise
            # Another process has the preferred port (a second replica on one host).
            log.warning("metrics port %d unavailable (%s); taking a free one", port, exc)
            self.metrics = self._metrics_server(registry, METRICS_PORT_FALLBACK)
            await self.metrics.start()

    async def start(self) -> int:
        # Consumer names are new at every start: a restarted process keeps its instance id
        # (a container restart keeps the pod's name), and under an existing name JetStream
        # would resume where the last process stopped instead of replaying the release
        # history its empty state needs. Consumers of stopped processes lapse after
        # ``release_consumer_inactive_s``.
        prefix = f"monitor-{self.settings.instance_id}-{uuid.uuid4().hex[:6]}"
        inactive = self.settings.release_consumer_inactive_s
        # Every replica judges every release, so each needs all the results: a shared
        # durable would split the batches and each replica would judge a fraction. The
        # replicas' identical decisions land once (deterministic event ids, monitor.py).
        self.bus.subscribe(
            METRICS_REQUESTS,
            f"{prefix}-metrics",
            self.monitor.on_metrics,
            deliver_policy=DeliverPolicy.NEW,
            inactive_threshold_s=inactive,
        )
        # Users' scores, the same way: whichever replica a SubmitFeedback call hit, every
        # replica's analysis and alerts count it (idempotent on the event id; the replica
        # that took the call applied it already). From now on, like the results: a replica
        # judges on what it has seen since it started.
        self.bus.subscribe(
            METRICS_FEEDBACK,
            f"{prefix}-feedback",
            self.monitor.on_feedback,
            deliver_policy=DeliverPolicy.NEW,
            inactive_threshold_s=inactive,
        )
        # Release state is the gateway's: rebuilt at every start by replaying route.changed
        # into a per-process consumer, then followed as it changes.
        self.bus.subscribe(
            ROUTE_CHANGED,
            f"{prefix}-routes",
            self.monitor.on_route_changed,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold_s=inactive,
        )
        if self.settings.metrics_port >= 0:
            self.dashboard.subscribe(self.bus, f"{prefix}-dashboard", inactive)
        await self.bus.start()
        self._loop = asyncio.create_task(
            self.monitor.run(self.settings.analysis_interval_s), name="release-analysis"
        )
        await self._start_metrics()
        return await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
        await self.monitor.close()
        if self._loop is not None:
            await cancel_and_wait([self._loop])
        if self.metrics is not None:
            await self.metrics.stop()
        await self.bus.close()
        await self._registry_channel.close()
        await self._auth_resolver.close()


async def serve(settings: MonitorSettings, stop: asyncio.Event) -> None:
    service = MonitorService(settings)
    # Before serving: the one collection it takes then pauses no request.
    freeze_startup_heap()
    await service.start()
    log.info("monitor serving on %s", service.address)
    await stop.wait()
    await service.stop()
