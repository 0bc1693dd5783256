"""Wiring: database, artifact store, core, gRPC server and the event bus, with a start
that never fails because a dependency is down (it reports NOT_SERVING and retries)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2_grpc
from ftops_registry.artifacts import ArtifactStore, LocalArtifactStore
from ftops_registry.artifacts_nats import NatsObjectArtifactStore
from ftops_registry.audit import AuditLog
from ftops_registry.auto_retention import AutoRetention
from ftops_registry.db import Database
from ftops_registry.jobs import JobRecords
from ftops_registry.keys import Keys
from ftops_registry.registry import Registry
from ftops_registry.release_events import DEFAULT_DURABLE, subscribe_release_events
from ftops_registry.releases import ReleaseHistory
from ftops_registry.retention import Retention
from ftops_registry.servicer import SERVICE_NAME, RegistryServicer
from ftops_registry.settings import RegistrySettings
from ftops_runtime import auth, events, tls
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.denials import DenialRecorder
from ftops_runtime.errors import FtopsError
from ftops_runtime.retry import retry_forever
from ftops_runtime.server import GrpcServer
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class RegistryApp:
    """The whole service in one object; ``__main__`` and the integration tests run it."""

    def __init__(self, settings: RegistrySettings, *, durable: str = DEFAULT_DURABLE) -> None:
        self.settings = settings
        self.durable = durable
        self.db = Database(settings.database_url, pool_size=settings.db_pool_size)
        self.store: ArtifactStore = (
            NatsObjectArtifactStore(
                settings.nats_url,
                # The installation's own bucket: <namespace>_<artifact_bucket>.
                settings.installation().bucket(settings.artifact_bucket),
                tmp_dir=settings.artifact_dir / "tmp",
                connect_options=tls.nats_connect_options(settings),
            )
            if settings.artifact_store == "nats"
            else LocalArtifactStore(settings.artifact_dir)
        )
        self.registry = Registry(self.db)
        self.releases = ReleaseHistory(self.db)
        self.jobs = JobRecords(self.db)
        self.keys = Keys(self.db)
        self.audit = AuditLog(self.db)
        # The registry's own refusals go straight into its audit log, aggregated.
        self.denials = DenialRecorder("registry", self._write_denials)
        self.auth_mode = auth.effective_mode(settings)
        self.bus = EventBus(
            settings.nats_url,
            service="registry",
            instance=settings.instance_id,
            max_deliver=settings.event_max_deliver,
            nak_delay_s=settings.event_nak_delay_s,
            stream_replicas=settings.event_stream_replicas,
            namespace=settings.namespace,
            connect_options=tls.nats_connect_options(settings),
        )
        self.retention = Retention(
            self.db, self.store, gc_grace=timedelta(seconds=settings.artifact_gc_grace_s)
        )
        self.auto_retention = (
            AutoRetention(
                self.db,
                self.retention,
                keep_last=settings.retention_keep_last,
                interval_s=settings.retention_interval_s,
            )
            if settings.retention_keep_last > 0
            else None
        )
        self._retention_task: asyncio.Task[None] | None = None
        self.servicer = RegistryServicer(
            self.db,
            self.registry,
            self.releases,
            self.store,
            self.jobs,
            max_artifact_bytes=settings.max_artifact_mb * 1024 * 1024,
            max_lora_rank=settings.max_lora_rank,
            retention=self.retention,
            audit=self.audit,
            keys=self.keys,
            key_changed=self._announce_key_changed,
        )
        # Keys are resolved from this registry's own database; Authenticate itself is
        # public (it is how the other services check their callers' keys).
        self.server = GrpcServer(
            settings,
            service_names=[SERVICE_NAME],
            checks={"database": self._database_ok, "nats": self._nats_ok},
            authenticate=auth.authenticator(
                self.servicer.resolve_key,
                mode=self.auth_mode,
                public={f"/{SERVICE_NAME}/Authenticate"},
            ),
            denials=self.denials,
        )
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(self.servicer, self.server.server)
        self._migrate_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def _database_ok(self) -> bool:
        return self.db.ready and await self.db.run_unchecked(self.db.ping)

    async def _nats_ok(self) -> bool:
        return self.bus.ready

    async def _write_denials(self, entries: list[events_pb2.AccessDenied]) -> None:
        await self.db.run(self.audit.record_denials, entries)

    async def _on_denied(self, batch: events_pb2.AccessDeniedBatch, delivery: Delivery) -> None:
        """Another service's refusals (audit.denied); a redelivered batch is written once."""
        await self.db.run(self.audit.record_denials, list(batch.denials), batch.meta.event_id)

    async def _announce_key_changed(self, key_id: str, revoked: bool) -> None:
        """Every service forgets the key now; if NATS cannot take the event, their cache
        TTL (FTOPS_AUTH_CACHE_TTL_S) still ends its use."""
        event = events_pb2.ApiKeyChanged(
            meta=events.new_meta("registry", self.settings.instance_id),
            key_id=key_id,
            revoked=revoked,
        )
        try:
            await self.bus.publish(events.AUTH_KEY_CHANGED, event, timeout=2.0)
        except Exception as exc:
            log.error(
                "could not announce the revocation of API key %s (services drop it within "
                "FTOPS_AUTH_CACHE_TTL_S=%s s): %r",
                key_id,
                self.settings.auth_cache_ttl_s,
                exc,
            )

    async def _prepare_database(self) -> None:
        await retry_forever(
            f"migrate the registry database at {self.db.url.render_as_string()}",
            lambda: self.db.run_unchecked(self.db.migrate),
        )
        log.info("registry database ready")
        if self.settings.bootstrap_admin_key:
            try:
                _, created = await self.db.run(
                    self.keys.bootstrap_admin, self.settings.bootstrap_admin_key
                )
                log.info("bootstrap platform-admin key %s", "created" if created else "present")
            except FtopsError as exc:  # a bad setting must not stop the registry serving
                log.error("FTOPS_BOOTSTRAP_ADMIN_KEY not applied: %s", exc)
        if self.auth_mode is auth.AuthMode.disabled:
            log.warning("authentication is DISABLED (development mode): every caller is admin")
        # Only now: an event handled before the schema exists would just fail and retry.
        subscribe_release_events(self.bus, self.db, self.releases, durable=self.durable)
        # Shared by the registry replicas: each batch is written once.
        self.bus.subscribe(events.AUDIT_DENIED, f"{self.durable}-audit-denied", self._on_denied)
        if self.auto_retention is not None:
            self._retention_task = asyncio.create_task(
                self.auto_retention.run(), name="scheduled-retention"
            )

    async def start(self) -> int:
        port = await self.server.start()
        await self.bus.start()
        self._migrate_task = asyncio.create_task(self._prepare_database(), name="db-migrate")
        return port

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the database is migrated and NATS connected (tests, scripts)."""
        assert self._migrate_task is not None, "start() first"
        await asyncio.wait_for(asyncio.shield(self._migrate_task), timeout)
        await self.bus.wait_ready(timeout)

    async def stop(self) -> None:
        await self.server.stop()
        if self._migrate_task is not None:
            await cancel_and_wait([self._migrate_task, self._retention_task])
        await self.bus.close()
        await asyncio.to_thread(self.db.close)
        if isinstance(self.store, NatsObjectArtifactStore):
            await asyncio.to_thread(self.store.close)
