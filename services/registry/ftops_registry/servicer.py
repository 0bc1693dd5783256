"""The gRPC face of the registry: validates transport-level things (streams, oneofs) and
hands everything else to the core on the database thread pool."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_registry import convert
from ftops_registry.artifacts import (
    ArtifactStore,
    UploadSession,
    read_verified,
    validate_manifest,
)
from ftops_registry.audit import AuditLog
from ftops_registry.db import Database
from ftops_registry.jobs import JobRecords
from ftops_registry.registry import Registry, file_specs
from ftops_registry.releases import ReleaseHistory
from ftops_registry.retention import Retention
from ftops_runtime.errors import FtopsError, InvalidArgument, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
_DONE = object()


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self,
        db: Database,
        registry: Registry,
        releases: ReleaseHistory,
        store: ArtifactStore,
        jobs: JobRecords,
        *,
        max_artifact_bytes: int,
        retention: Retention,
        audit: AuditLog,
    ) -> None:
        self._retention = retention
        self._db = db
        self._audit = audit
        self._registry = registry
        self._releases = releases
        self._jobs = jobs
        self._store = store
        self._max_artifact_bytes = max_artifact_bytes

    async def _audited(
        self,
        method: str,
        resource: str,
        adapter: str,
        fn: Callable[..., T],
        *args: Any,
        team: str = "",
    ) -> T:
        """Run a mutation; a refused one is audited in its own transaction (a successful
        one audits itself inside its transaction). The refusal's team is ``team``, else
        the adapter's."""
        try:
            return await self._db.run(fn, *args)
        except FtopsError as exc:
            await self._audit_failure(method, resource, exc, adapter, team)
            raise

    async def _audit_failure(
        self, method: str, resource: str, exc: FtopsError, adapter: str = "", team: str = ""
    ) -> None:
        if isinstance(exc, Unavailable):
            return  # the database is what failed: nowhere to write the entry
        try:
            await self._db.run(
                self._audit.record_failure,
                method,
                resource,
                exc.code.name,
                str(exc),
                adapter,
                team,
            )
        except Exception:  # the caller's error matters more than the audit entry's
            log.exception("could not audit the refused %s on %s", method, resource)

    async def RegisterBaseModel(
        self, request: registry_pb2.RegisterBaseModelRequest, context: Any
    ) -> registry_pb2.BaseModel:
        return await self._audited(
            "RegisterBaseModel",
            f"base_model:{request.name}",
            "",
            self._registry.register_base_model,
            request.name,
            request.fingerprint,
            request.uri,
        )

    async def GetBaseModel(
        self, request: registry_pb2.GetBaseModelRequest, context: Any
    ) -> registry_pb2.BaseModel:
        return await self._db.run(self._registry.get_base_model, request.name)

    async def UploadArtifact(
        self, request_iterator: AsyncIterator[registry_pb2.UploadArtifactRequest], context: Any
    ) -> registry_pb2.Artifact:
        try:
            return await self._upload(request_iterator)
        except FtopsError as exc:
            # The id is the manifest's hash, unknown until a valid header: name the RPC.
            await self._audit_failure("UploadArtifact", "artifact:", exc)
            raise

    async def _upload(
        self, request_iterator: AsyncIterator[registry_pb2.UploadArtifactRequest]
    ) -> registry_pb2.Artifact:
        if not self._db.ready:  # fail before the client streams megabytes at us
            raise Unavailable("the registry database is not ready yet (starting or migrating)")
        stream = aiter(request_iterator)
        first = await anext(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("UploadArtifact must start with a header message")
        specs = file_specs(first.header.files)
        validate_manifest(specs, max_total_bytes=self._max_artifact_bytes)
        session = UploadSession(self._store, specs)
        try:
            async for msg in stream:
                if msg.WhichOneof("part") != "chunk":
                    raise InvalidArgument("only chunks may follow the upload header")
                # File writes block; keep them off the event loop.
                await asyncio.to_thread(session.write, msg.chunk.file_index, msg.chunk.data)
            await asyncio.to_thread(session.finish)
        except BaseException:
            session.abort()  # quick unlinks; must also run when the call is cancelled
            raise
        return await self._db.run(self._registry.record_artifact, specs)

    async def DownloadArtifact(
        self, request: registry_pb2.DownloadArtifactRequest, context: Any
    ) -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
        manifest = await self._db.run(self._registry.get_artifact, request.artifact_id)
        yield registry_pb2.DownloadArtifactResponse(manifest=manifest)
        for index, spec in enumerate(file_specs(manifest.files)):
            chunks = read_verified(self._store, spec, manifest.artifact_id)
            while (data := await asyncio.to_thread(next, chunks, _DONE)) is not _DONE:
                assert isinstance(data, bytes)
                yield registry_pb2.DownloadArtifactResponse(
                    chunk=registry_pb2.FileChunk(file_index=index, data=data)
                )

    async def RegisterVersion(
        self, request: registry_pb2.RegisterVersionRequest, context: Any
    ) -> registry_pb2.Version:
        return await self._audited(
            "RegisterVersion",
            f"adapter:{request.adapter}",
            request.adapter,
            self._registry.register_version,
            request,
        )

    async def GetVersion(
        self, request: registry_pb2.GetVersionRequest, context: Any
    ) -> registry_pb2.Version:
        ref = request.version_id or request.name
        if not ref:
            raise InvalidArgument("GetVersion needs version_id or name ('adapter:number')")
        return await self._db.run(self._registry.get_version, ref)

    async def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: Any
    ) -> registry_pb2.ListVersionsResponse:
        return await self._db.run(
            self._registry.list_versions, request.adapter, request.page_size, request.page_token
        )

    async def GetLineage(
        self, request: registry_pb2.GetLineageRequest, context: Any
    ) -> registry_pb2.GetLineageResponse:
        return await self._db.run(self._registry.get_lineage, request.version_id)

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: Any
    ) -> registry_pb2.Alias:
        return await self._audited(
            "SetAlias",
            f"alias:{request.adapter}/{request.name}",
            request.adapter,
            self._registry.set_alias,
            request.adapter,
            request.name,
            request.version_id,
        )

    async def GetAlias(
        self, request: registry_pb2.GetAliasRequest, context: Any
    ) -> registry_pb2.Alias:
        return await self._db.run(self._registry.get_alias, request.adapter, request.name)

    async def GetRelease(
        self, request: registry_pb2.GetReleaseRequest, context: Any
    ) -> registry_pb2.Release:
        return await self._db.run(self._releases.get, request.release_id)

    async def ListReleases(
        self, request: registry_pb2.ListReleasesRequest, context: Any
    ) -> registry_pb2.ListReleasesResponse:
        return await self._db.run(
            self._releases.list, request.alias, request.page_size, request.page_token
        )

    async def PutJob(
        self, request: registry_pb2.PutJobRequest, context: Any
    ) -> registry_pb2.JobRecord:
        return await self._audited(
            "PutJob",
            f"job:{request.job.job_id}",
            "",
            self._jobs.put,
            request.job,
            request.expected_revision,
            team=request.job.spec.team,
        )

    async def GetJob(
        self, request: registry_pb2.GetJobRecordRequest, context: Any
    ) -> registry_pb2.JobRecord:
        return await self._db.run(self._jobs.get, request.job_id)

    async def ListJobs(
        self, request: registry_pb2.ListJobRecordsRequest, context: Any
    ) -> registry_pb2.ListJobRecordsResponse:
        return await self._db.run(
            self._jobs.list,
            request.adapter,
            request.team,
            list(request.states),
            request.page_size,
            request.page_token,
        )

    async def ListAudit(
        self, request: registry_pb2.ListAuditRequest, context: Any
    ) -> registry_pb2.ListAuditResponse:
        since = convert.from_timestamp(request.since) if request.HasField("since") else None
        return await self._db.run(
            self._audit.list,
            request.team,
            request.resource_prefix,
            since,
            request.page_size,
            request.page_token,
        )

    async def ArchiveVersions(
        self, request: registry_pb2.ArchiveVersionsRequest, context: Any
    ) -> registry_pb2.ArchiveVersionsResponse:
        return await self._audited(
            "ArchiveVersions",
            f"adapter:{request.adapter}",
            request.adapter,
            self._retention.archive_versions,
            request.adapter,
            request.keep_last,
            request.dry_run,
        )

    async def GarbageCollectArtifacts(
        self, request: registry_pb2.GarbageCollectArtifactsRequest, context: Any
    ) -> registry_pb2.GarbageCollectArtifactsResponse:
        return await self._audited(
            "GarbageCollectArtifacts",
            "artifact:",
            "",
            self._retention.collect_artifacts,
            request.dry_run,
        )
