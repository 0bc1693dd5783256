"""The gRPC server skeleton every service runs: health, reflection, interceptors, and a
graceful shutdown (NOT_SERVING first so load balancers drain, then stop with a grace)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ftops.common.v1 import runtime_pb2_grpc
from ftops_runtime.denials import DenialRecorder
from ftops_runtime.interceptors import Authenticator, CallInterceptor, api_key_authenticator
from ftops_runtime.runtime_stats import SERVICE_NAME as RUNTIME_SERVICE_NAME
from ftops_runtime.runtime_stats import RuntimeServicer
from ftops_runtime.settings import ServiceSettings
from ftops_runtime.tasks import cancel_and_wait
from ftops_runtime.tls import ServerTls
from ftops_runtime.tls import load as load_tls

log = logging.getLogger(__name__)

DependencyCheck = Callable[[], Awaitable[bool]]


def grpc_options(max_message_mb: int) -> list[tuple[str, Any]]:
    size = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc's health servicer with ``List`` answered (reflection advertises it; grpc's
    own raises NotImplementedError there, which came out as INTERNAL and a traceback)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        # _server_status: grpc's own record of what Check answers, one entry per service.
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


class GrpcServer:
    """Owns a ``grpc.aio.Server``. Register servicers on ``.server`` before ``start()``.

    ``checks`` are the service's own dependencies (NATS, database, Redis, model); the
    health status is SERVING only while all of them pass, probed every
    ``health_interval_s``.

    ``denials`` records the calls it refuses for the audit log (flushed on ``stop``).
    """

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        service_names: Sequence[str],
        checks: dict[str, DependencyCheck] | None = None,
        authenticate: Authenticator | None = None,
        denials: DenialRecorder | None = None,
    ) -> None:
        self.settings = settings
        self.service_names = list(service_names)
        self.checks = dict(checks or {})
        auth = authenticate or api_key_authenticator(settings.api_key_set())
        self.denials = denials
        # Read now: a bad certificate setting fails the service's construction, not a call.
        self.tls: ServerTls | None = load_tls(settings).server
        self.server = grpc.aio.server(
            interceptors=[CallInterceptor(auth, denials)],
            options=grpc_options(settings.max_message_mb),
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # Resident memory, fds, asyncio tasks (bench/soak.py samples them).
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(
            RuntimeServicer(
                _service_label(self.service_names),
                settings.instance_id,
                open_to_anonymous=authenticate is None and not settings.api_key_set(),
            ),
            self.server,
        )
        reflection.enable_server_reflection(
            [
                *self.service_names,
                RUNTIME_SERVICE_NAME,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        self.port = 0
        self._probe_task: asyncio.Task[None] | None = None
        self._serving: bool | None = None
        self.failing: list[str] = []
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.settings.grpc_host}:{self.port}"

    async def start(self) -> int:
        bind = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        if self.tls is None:
            self.port = self.server.add_insecure_port(bind)
        else:
            self.port = self.server.add_secure_port(bind, self.tls.grpc_credentials())
        if self.port == 0:
            raise RuntimeError(
                f"could not bind {self.settings.grpc_host}:{self.settings.grpc_port}"
            )
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="health-probe")
        log.info(
            "gRPC listening on %s (%s)%s",
            self.address,
            ", ".join(self.service_names),
            _tls_note(self.tls),
        )
        return self.port

    async def __aenter__(self) -> GrpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _set_all(self, status: Any) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def probe(self) -> bool:
        failing = []
        for name, check in self.checks.items():
            try:
                ok = await asyncio.wait_for(
                    check(), timeout=max(self.settings.health_interval_s, 1)
                )
            except Exception:
                ok = False
            if not ok:
                failing.append(name)
        serving = not failing
        if serving != self._serving:
            if serving:
                log.info("all dependencies reachable: SERVING")
            else:
                log.warning("dependencies not reachable: %s: NOT_SERVING", ", ".join(failing))
            self._serving = serving
            self.failing = failing
            await self._set_all(
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
        return serving

    async def _probe_loop(self) -> None:
        while not self._stopped:
            await self.probe()
            await asyncio.sleep(self.settings.health_interval_s)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._probe_task is not None:
            await cancel_and_wait([self._probe_task])
        # NOT_SERVING first: balancers stop sending new calls while in-flight ones finish.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=self.settings.shutdown_grace_s)
        if self.denials is not None:
            await self.denials.close()
        log.info("gRPC server stopped")


def _service_label(service_names: Sequence[str]) -> str:
    """ "gateway" for ["ftops.gateway.v1.GatewayService"]; the full name otherwise."""
    parts = service_names[0].split(".") if service_names else []
    return parts[1] if len(parts) > 2 and parts[0] == "ftops" else ".".join(parts)


def _tls_note(tls: ServerTls | None) -> str:
    if tls is None:
        return ", plaintext"
    return ", TLS, client certificates required" if tls.require_client_cert else ", TLS"


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
