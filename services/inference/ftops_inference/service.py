"""Wires the inference service together: model, registry client, NATS, gRPC server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import cast

from ftops.events.v1 import events_pb2
from ftops.inference.v1 import inference_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_inference.access import InferenceAccess
from ftops_inference.adapter_check import AdapterLimits
from ftops_inference.adapter_events import AdapterEvents
from ftops_inference.adapter_methods import SERVED
from ftops_inference.announce import Announcer
from ftops_inference.backend import Backend
from ftops_inference.chat import ChatRenderer
from ftops_inference.core import InferenceCore
from ftops_inference.faults import Faults
from ftops_inference.loader import AdapterLoader
from ftops_inference.servicer import InferenceServicer
from ftops_inference.settings import InferenceSettings
from ftops_runtime import auth, client, hashing, tls
from ftops_runtime.bus import EventBus
from ftops_runtime.heap import freeze_startup_heap
from ftops_runtime.retry import retry_forever
from ftops_runtime.server import GrpcServer
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVICE_NAME = "ftops.inference.v1.InferenceService"


class InferenceService:
    """A running inference replica. ``start()`` returns once the port is bound; the model
    loads in the background while health says NOT_SERVING."""

    def __init__(
        self,
        settings: InferenceSettings,
        backend: Backend | None = None,
        *,
        freeze_heap: bool = False,
    ) -> None:
        """``freeze_heap``: the process entry point's choice (see ftops_runtime.heap)."""
        if not settings.base_model_path:
            raise ValueError("FTOPS_BASE_MODEL_PATH is not set")
        self.settings = settings
        self._freeze_heap = freeze_heap
        self.model_dir = Path(settings.base_model_path).resolve()
        if backend is None and settings.backend != "echo":
            # Before any weight is read: a directory that is no model, or a model too large
            # for this replica, is refused at once with the reason (and the estimate).
            from ftops_models import check_base_model

            vllm_dtype = settings.vllm_dtype if settings.backend == "vllm" else "auto"
            check_base_model(
                self.model_dir,
                limit_mb=settings.max_model_memory_mb,
                dtype=None if vllm_dtype == "auto" else vllm_dtype,
            )
        self.backend: Backend = backend or make_backend(settings, self.model_dir)
        self.bus = EventBus(
            settings.nats_url,
            service="inference",
            instance=settings.instance_id,
            max_deliver=settings.event_max_deliver,
            nak_delay_s=settings.event_nak_delay_s,
            stream_replicas=settings.event_stream_replicas,
            namespace=settings.namespace,
            connect_options=tls.nats_connect_options(settings),
        )
        self.core = InferenceCore(
            self.backend,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_new_tokens_limit=settings.max_new_tokens_limit,
            default_max_tokens=settings.default_max_tokens,
            max_concurrent_requests=settings.max_concurrent_requests,
            max_queue_length=settings.max_queue_length,
            max_queue_wait_s=settings.max_queue_wait_s,
            best_effort_reserve=settings.best_effort_reserve(),
            max_best_effort=settings.max_best_effort_running,
            best_effort_max_busy=settings.best_effort_max_busy,
            busy_share=_busy_share(self.backend),
            faults=Faults(
                error_rate=settings.fault_error_rate,
                delay_factor=settings.fault_delay_factor,
                versions=settings.fault_version_set(),
            ),
        )
        if self.core.faults.active:
            log.warning(
                "FAULT INJECTION ON: error rate %.2f, delay x%.1f, versions %s",
                settings.fault_error_rate,
                settings.fault_delay_factor,
                settings.fault_versions or "all",
            )
        # Callers' keys are checked by the registry (cached for auth_cache_ttl_s).
        # Revocations applied at once (auth.key_changed); refusals audited by the registry.
        authenticate, self._auth_resolver = auth.registry_authenticator(
            settings, settings.registry_address, bus=self.bus, service="inference"
        )
        self.server = GrpcServer(
            settings,
            service_names=[SERVICE_NAME],
            checks={
                "nats": self._nats_ok,
                "model": self._model_ok,
                "registry": self._registry_ok,
            },
            authenticate=authenticate,
            denials=self._auth_resolver.denials,
        )
        self._registry_channel = client.channel(
            settings.registry_address,
            api_key=settings.registry_api_key,
            tls=tls.load(settings).client,
        )
        self.registry = cast(
            "registry_pb2_grpc.RegistryServiceAsyncStub",
            registry_pb2_grpc.RegistryServiceStub(self._registry_channel),
        )
        access = InferenceAccess(
            auth.VersionTeams(
                registry_pb2_grpc.RegistryServiceStub(self._registry_channel),
                timeout_s=settings.registry_timeout_s,
            ),
            enforce=auth.effective_mode(settings) is auth.AuthMode.enabled,
        )
        self.servicer = InferenceServicer(
            self.core,
            base_model=settings.base_model_name,
            replica_id=settings.instance_id,
            access=access,
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, self.server.server)
        self._nats_reached = False
        self.base_registered = False
        self.base_fingerprint = ""
        self.events: AdapterEvents | None = None
        self.announcer = Announcer(
            self.bus,
            self._announcement,
            replica_id=settings.instance_id,
            interval_s=settings.announce_interval_s,
        )
        self.backend.watch(self.announcer.changed, self.core.metrics.adapter_event)
        self._startup: asyncio.Task[None] | None = None
        self._stopped = False
        self._last_model_ok = False

    async def _nats_ok(self) -> bool:
        return self._nats_usable()

    def _nats_usable(self) -> bool:
        """Once the replica has reached NATS, an outage only delays new versions and its
        announcements: it keeps serving what it holds, so neither its health nor the
        announcement after the outage says otherwise (a gateway would drop it)."""
        self._nats_reached = self._nats_reached or self.bus.ready
        return self._nats_reached

    async def _model_ok(self) -> bool:
        # A crashed backend reports NOT_SERVING (health and announcements) until its probe
        # pass succeeds again; draining is NOT_SERVING too.
        ok = self.core.serving
        if ok != self._last_model_ok:
            self._last_model_ok = ok
            self.announcer.changed()
        return ok

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
        # Announced from the start (serving=false while the model loads).
        self.announcer.start()
        return port

    def _announcement(self) -> events_pb2.ReplicaAnnounce:
        loader = self.core.loader
        loaded = set(self.backend.loaded())
        cached = set(self.backend.cached())
        # Only versions that passed every check; a backend tier alone is not enough.
        servable = [
            r.version_id for r in self.core.adapters() if loader and loader.loaded_id(r.version_id)
        ]
        return events_pb2.ReplicaAnnounce(
            replica_id=self.settings.instance_id,
            endpoint=self.endpoint,
            base_model=self.settings.base_model_name,
            base_model_fingerprint=self.base_fingerprint,
            loaded_versions=[v for v in servable if v in loaded],
            cached_versions=[v for v in servable if v in cached],
            max_concurrent=self.core.max_concurrent,
            in_flight=self.core.in_flight,
            serving=self.core.serving and self.base_registered and self._nats_usable(),
            backend=self.backend.kind,
        )

    async def wait_ready(self) -> None:
        """Until the model is loaded, registered, and adapter.ready is consumed."""
        assert self._startup is not None
        await asyncio.shield(self._startup)
        await self.bus.wait_ready()

    async def _start_model(self) -> None:
        self.base_fingerprint = await asyncio.to_thread(hashing.model_fingerprint, self.model_dir)
        await self.backend.start()
        self.core.chat = await asyncio.to_thread(
            ChatRenderer.load, self.model_dir, self.settings.base_model_name
        )
        self.core.loader = AdapterLoader(
            registry=self.registry,
            backend=self.backend,
            cache_dir=Path(self.settings.adapter_cache_dir),
            base_fingerprint=self.base_fingerprint,
            registry_timeout_s=self.settings.registry_timeout_s,
            duty_cycle=self.settings.load_duty_cycle,
            busy=lambda: self.core.in_flight > 0,
            limits=adapter_limits(self.settings),
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
        if self._freeze_heap:
            # Now that the model is in memory (most of what a collection walks), and before
            # serving is announced: the one collection it takes pauses no request.
            freeze_startup_heap()
        log.info("base model %s ready (%s)", self.model_dir, self.base_fingerprint[:12])
        await retry_forever("register the base model in the registry", self._register_base)
        self.base_registered = True
        # Serving from now on: say so at once, not at the next heartbeat (a gateway that
        # starts meanwhile would otherwise hold this replica unusable for an interval).
        self.announcer.changed()
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

    async def drain(self) -> None:
        """Stop taking requests and let in-flight ones finish, within drain_timeout_s."""
        if self.core.draining:
            return
        self.core.draining = True
        log.info("draining: %d requests in flight", self.core.in_flight)
        await self.announcer.announce("drain")
        await self.server.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self.core.wait_idle(), self.settings.drain_timeout_s)
        except TimeoutError:
            # Those still waiting for a slot produced nothing: refused UNAVAILABLE, the
            # gateway retries them on another replica.
            refused = self.core.refuse_waiting()
            log.warning(
                "drain timeout: %d requests still running, %d waiting refused",
                self.core.admission.running,
                refused,
            )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.drain()
        await self.announcer.stop()
        # Gateways' multiplexed streams never end on their own: end them, or the server's
        # graceful stop would wait its whole grace period for them.
        self.servicer.end_streams()
        await self.server.stop()
        if self._startup is not None and not self._startup.done():
            await cancel_and_wait([self._startup])
        await self.announcer.announce("stop")
        await self.bus.close()
        await self._auth_resolver.close()
        await self._registry_channel.close()
        await self.backend.close()


def adapter_limits(settings: InferenceSettings) -> AdapterLimits:
    """What this replica loads: vLLM's engine serves LoRA only, and ranks up to its own
    maximum only."""
    max_rank = settings.max_lora_rank
    if settings.backend == "vllm":
        max_rank = min(max_rank, settings.vllm_max_lora_rank)
    return AdapterLimits(
        max_rank=max_rank,
        max_abs_weight=settings.max_adapter_weight,
        methods=SERVED[settings.backend],
        backend=settings.backend,
    )


def _busy_share(backend: Backend) -> Callable[[], float] | None:
    """The model thread's busy share, where the backend measures it (the HF backend's batch
    engine; vLLM schedules on its own, the echo backend computes nothing)."""
    share = getattr(backend, "busy_share", None)
    return share if callable(share) else None


def make_backend(settings: InferenceSettings, model_dir: Path) -> Backend:
    """The backend the settings name; heavy imports only for the one chosen."""
    if settings.backend == "echo":
        from ftops_inference.echo_backend import EchoBackend

        return EchoBackend(model_dir, token_delay_s=settings.echo_token_delay_ms / 1000)
    if settings.backend == "vllm":
        from ftops_inference.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, settings)
    from ftops_inference.hf_backend import HFPeftBackend

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return HFPeftBackend(
        model_dir,
        device=settings.device,
        max_batch_size=settings.max_batch_size,
        max_batch_wait_ms=settings.max_batch_wait_ms,
        max_loaded=settings.max_loaded,
        max_cached=settings.max_cached,
        lora_kernel=settings.lora_kernel,
    )


async def serve(settings: InferenceSettings, stop: asyncio.Event) -> None:
    service = InferenceService(settings, freeze_heap=True)
    await service.start()
    log.info("inference listening on %s (advertised as %s)", service.address, service.endpoint)
    await stop.wait()
    await service.stop()
