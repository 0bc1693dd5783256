"""The gRPC face of the registry: validates transport-level things (streams, oneofs),
authorizes the caller against the resource's team (docs/security.md) and hands everything
else to the core on the database thread pool. Every refusal is audited."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_registry import convert, ownership
from ftops_registry.artifacts import (
    DEFAULT_MAX_LORA_RANK,
    ArtifactStore,
    UploadSession,
    read_verified,
    validate_manifest,
)
from ftops_registry.audit import AuditLog
from ftops_registry.db import Database
from ftops_registry.jobs import JobRecords
from ftops_registry.keys import Keys
from ftops_registry.registry import Registry, file_specs
from ftops_registry.releases import ReleaseHistory
from ftops_registry.retention import Retention
from ftops_runtime import auth, denials
from ftops_runtime.auth import AuthPrincipal, Role
from ftops_runtime.errors import (
    FtopsError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from ftops_runtime.interceptors import note_denial

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
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        retention: Retention,
        audit: AuditLog,
        keys: Keys,
        key_changed: Callable[[str, bool], Awaitable[None]] | None = None,
    ) -> None:
        self._keys = keys
        # Announces a revoked key to every service's key cache (auth.key_changed).
        self._key_changed = key_changed
        self._retention = retention
        self._db = db
        self._audit = audit
        self._registry = registry
        self._releases = releases
        self._jobs = jobs
        self._store = store
        self._max_artifact_bytes = max_artifact_bytes
        self._max_lora_rank = max_lora_rank

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
        denials.mark_audited(exc)  # with its resource, here: the runtime need not add it
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

    # -- authorization -----------------------------------------------------------------

    async def _allow(
        self, method: str, resource: str, team: str, check: Callable[[], AuthPrincipal]
    ) -> AuthPrincipal:
        """Run an ``auth.require*`` check; a refusal is audited under ``team``."""
        try:
            return check()
        except PermissionDenied as exc:
            await self._audit_failure(method, resource, exc, team=team)
            raise

    async def _require(self, method: str, resource: str, team: str, role: Role) -> AuthPrincipal:
        return await self._allow(
            method, resource, team, lambda: auth.require(team, role, action=method)
        )

    async def _adapter_team(self, adapter: str) -> str:
        """The team that owns ``adapter``; an unknown adapter passes through as "" (the
        core then answers NOT_FOUND or INVALID_ARGUMENT)."""
        return await self._db.run(ownership.adapter_team, self._db, adapter) or ""

    @staticmethod
    def _visible_teams(p: AuthPrincipal) -> frozenset[str] | None:
        """The teams a listing is limited to: None (all) for a platform admin."""
        return None if p.platform_admin else p.teams(Role.viewer)

    async def _scope(
        self, method: str, resource: str, team: str
    ) -> tuple[str, frozenset[str] | None]:
        """A listing's filter: the requested team (which the caller must see) or every
        team the caller sees."""
        if team:
            await self._require(method, resource, team, Role.viewer)
            return team, None
        return "", self._visible_teams(auth.current())

    # -- base models -----------------------------------------------------------------

    async def RegisterBaseModel(
        self, request: registry_pb2.RegisterBaseModelRequest, context: Any
    ) -> registry_pb2.BaseModel:
        resource = f"base_model:{request.name}"
        # Shared by every team: only a platform admin or some team's admin adds one.
        caller = await self._allow(
            "RegisterBaseModel",
            resource,
            "",
            lambda: auth.require_any_team(Role.admin, action="RegisterBaseModel"),
        )
        # Moving one that other teams' adapters train on is for platform admins only: the
        # core decides inside its transaction, against the adapters that use it then.
        return await self._audited(
            "RegisterBaseModel",
            resource,
            "",
            self._registry.register_base_model,
            request.name,
            request.fingerprint,
            request.uri,
            None if caller.platform_admin else caller.teams(Role.admin),
        )

    async def GetBaseModel(
        self, request: registry_pb2.GetBaseModelRequest, context: Any
    ) -> registry_pb2.BaseModel:
        return await self._db.run(self._registry.get_base_model, request.name)

    # -- artifacts -------------------------------------------------------------------

    async def UploadArtifact(
        self, request_iterator: AsyncIterator[registry_pb2.UploadArtifactRequest], context: Any
    ) -> registry_pb2.Artifact:
        try:
            return await self._upload(request_iterator)
        except FtopsError as exc:
            # The id is the manifest's hash, unknown until a valid header: name the RPC.
            if not isinstance(exc, PermissionDenied):  # audited where it was refused
                await self._audit_failure("UploadArtifact", "artifact:", exc)
            raise

    async def _upload_team(self, requested: str) -> str:
        """The team an upload is for: the requested one, else the caller's only trainer
        team. Authorized before a single byte is stored."""
        p = auth.current()
        if requested or p.platform_admin:
            await self._require("UploadArtifact", "artifact:", requested, Role.trainer)
            return requested
        teams = sorted(p.teams(Role.trainer))
        if len(teams) == 1:
            return teams[0]
        await self._allow(
            "UploadArtifact",
            "artifact:",
            "",
            lambda: auth.require_any_team(Role.trainer, action="UploadArtifact"),
        )
        raise InvalidArgument(
            f"the key is a trainer in several teams ({', '.join(teams)}): say which one the "
            "artifact is for (UploadHeader.team)"
        )

    async def _upload(
        self, request_iterator: AsyncIterator[registry_pb2.UploadArtifactRequest]
    ) -> registry_pb2.Artifact:
        if not self._db.ready:  # fail before the client streams megabytes at us
            raise Unavailable("the registry database is not ready yet (starting or migrating)")
        stream = aiter(request_iterator)
        first = await anext(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("UploadArtifact must start with a header message")
        team = await self._upload_team(first.header.team)
        specs = file_specs(first.header.files)
        validate_manifest(specs, max_total_bytes=self._max_artifact_bytes)
        session = UploadSession(self._store, specs, max_lora_rank=self._max_lora_rank)
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
        return await self._db.run(self._registry.record_artifact, specs, team)

    async def DownloadArtifact(
        self, request: registry_pb2.DownloadArtifactRequest, context: Any
    ) -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
        manifest = await self._db.run(self._registry.get_artifact, request.artifact_id)
        if request.team:  # on behalf of a team: that team must be allowed, whoever asks
            resource = f"artifact:{manifest.artifact_id}"
            await self._require("DownloadArtifact", resource, request.team, Role.viewer)
            await self._check_artifacts(
                "DownloadArtifact",
                [manifest.artifact_id],
                Role.viewer,
                team=request.team,
                on_behalf=True,
            )
        else:
            await self._check_artifacts("DownloadArtifact", [manifest.artifact_id], Role.viewer)
        yield registry_pb2.DownloadArtifactResponse(manifest=manifest)
        for index, spec in enumerate(file_specs(manifest.files)):
            chunks = read_verified(self._store, spec, manifest.artifact_id)
            while (data := await asyncio.to_thread(next, chunks, _DONE)) is not _DONE:
                assert isinstance(data, bytes)
                yield registry_pb2.DownloadArtifactResponse(
                    chunk=registry_pb2.FileChunk(file_index=index, data=data)
                )

    async def _check_artifacts(
        self,
        method: str,
        artifact_ids: list[str],
        role: Role,
        *,
        team: str | None = None,
        on_behalf: bool = False,
    ) -> None:
        """Each artifact must be usable by ``team`` (or, without one, by some team in which
        the caller holds ``role``): uploaded for it or used by its versions. Content
        addressing shares blobs, never access: another team's artifact id is no key.

        A named team is checked for platform admins too: a service acting for a team with
        a platform-admin key (the trainer) must not hand the team another team's data. A
        platform admin may still give a team an artifact of no team (its own upload),
        except ``on_behalf`` of the team (a download for it: only the team's own count).
        Only teamless resources (made before teams existed) and auth off skip the check."""
        p = auth.current()
        if p.platform_admin and (team is None or not team or p.anonymous):
            return
        owners = await self._db.run(ownership.artifact_teams, self._db, artifact_ids)
        allowed = {team} if team is not None else p.teams(role)
        for artifact_id, teams in owners.items():
            if not teams and p.platform_admin and not on_behalf:
                continue
            if not teams & allowed:
                exc = PermissionDenied(
                    f"{method}: artifact {artifact_id} was not uploaded for "
                    + (f"team {team!r}" if team is not None else f"a team your key is a {role} in")
                    + " nor used by its versions (upload it for the team first)"
                )
                await self._audit_failure(method, f"artifact:{artifact_id}", exc, team=team or "")
                raise exc

    # -- versions --------------------------------------------------------------------

    async def RegisterVersion(
        self, request: registry_pb2.RegisterVersionRequest, context: Any
    ) -> registry_pb2.Version:
        resource = f"adapter:{request.adapter}"
        existing = await self._db.run(ownership.adapter_team, self._db, request.adapter)
        team = existing if existing is not None else request.team
        await self._require("RegisterVersion", resource, team, Role.trainer)
        refs = [request.artifact_id, request.replay_artifact_id, request.dataset_artifact_id]
        await self._check_artifacts(
            "RegisterVersion", [r for r in refs if r], Role.trainer, team=team
        )
        if existing is not None and not request.team:
            # Pin the team we authorized: the core refuses if the adapter's differs.
            pinned = registry_pb2.RegisterVersionRequest()
            pinned.CopyFrom(request)
            pinned.team = team
            request = pinned
        return await self._audited(
            "RegisterVersion",
            resource,
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
        version = await self._db.run(self._registry.get_version, ref)
        await self._require(
            "GetVersion", f"version:{version.version_id}", version.team, Role.viewer
        )
        return version

    async def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: Any
    ) -> registry_pb2.ListVersionsResponse:
        team = await self._adapter_team(request.adapter)
        await self._require("ListVersions", f"adapter:{request.adapter}", team, Role.viewer)
        return await self._db.run(
            self._registry.list_versions, request.adapter, request.page_size, request.page_token
        )

    async def GetLineage(
        self, request: registry_pb2.GetLineageRequest, context: Any
    ) -> registry_pb2.GetLineageResponse:
        lineage = await self._db.run(self._registry.get_lineage, request.version_id)
        # A chain never leaves its adapter (a parent is always the same adapter's).
        head = lineage.chain[0]
        await self._require("GetLineage", f"version:{head.version_id}", head.team, Role.viewer)
        return lineage

    # -- aliases ---------------------------------------------------------------------

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: Any
    ) -> registry_pb2.Alias:
        resource = f"alias:{request.adapter}/{request.name}"
        team = await self._adapter_team(request.adapter)
        await self._require("SetAlias", resource, team, Role.releaser)
        return await self._audited(
            "SetAlias",
            resource,
            request.adapter,
            self._registry.set_alias,
            request.adapter,
            request.name,
            request.version_id,
        )

    async def GetAlias(
        self, request: registry_pb2.GetAliasRequest, context: Any
    ) -> registry_pb2.Alias:
        team = await self._adapter_team(request.adapter)
        await self._require(
            "GetAlias", f"alias:{request.adapter}/{request.name}", team, Role.viewer
        )
        return await self._db.run(self._registry.get_alias, request.adapter, request.name)

    # -- releases --------------------------------------------------------------------

    async def GetRelease(
        self, request: registry_pb2.GetReleaseRequest, context: Any
    ) -> registry_pb2.Release:
        release = await self._db.run(self._releases.get, request.release_id)
        team = await self._db.run(self._releases.team, release.release_id)
        await self._require("GetRelease", f"release:{release.release_id}", team, Role.viewer)
        return release

    async def ListReleases(
        self, request: registry_pb2.ListReleasesRequest, context: Any
    ) -> registry_pb2.ListReleasesResponse:
        return await self._db.run(
            self._releases.list,
            request.alias,
            request.page_size,
            request.page_token,
            self._visible_teams(auth.current()),
        )

    # -- job records -----------------------------------------------------------------

    async def PutJob(
        self, request: registry_pb2.PutJobRequest, context: Any
    ) -> registry_pb2.JobRecord:
        resource = f"job:{request.job.job_id}"
        team = request.job.spec.team
        await self._require("PutJob", resource, team, Role.trainer)
        stored = await self._db.run(ownership.job_team, self._db, request.job.job_id)
        if stored is not None and stored != team:
            # Moving a job to another team would hand it over: both must allow it.
            await self._require("PutJob", resource, stored, Role.trainer)
        return await self._audited(
            "PutJob",
            resource,
            "",
            self._jobs.put,
            request.job,
            request.expected_revision,
            team=team,
        )

    async def GetJob(
        self, request: registry_pb2.GetJobRecordRequest, context: Any
    ) -> registry_pb2.JobRecord:
        record = await self._db.run(self._jobs.get, request.job_id)
        await self._require("GetJob", f"job:{request.job_id}", record.job.spec.team, Role.viewer)
        return record

    async def ListJobs(
        self, request: registry_pb2.ListJobRecordsRequest, context: Any
    ) -> registry_pb2.ListJobRecordsResponse:
        team, teams = await self._scope("ListJobs", "job:", request.team)
        return await self._db.run(
            self._jobs.list,
            request.adapter,
            team,
            list(request.states),
            request.page_size,
            request.page_token,
            teams,
        )

    # -- audit and retention ---------------------------------------------------------

    async def ListAudit(
        self, request: registry_pb2.ListAuditRequest, context: Any
    ) -> registry_pb2.ListAuditResponse:
        team, teams = await self._scope("ListAudit", "audit:", request.team)
        since = convert.from_timestamp(request.since) if request.HasField("since") else None
        return await self._db.run(
            self._audit.list,
            team,
            request.resource_prefix,
            since,
            request.page_size,
            request.page_token,
            teams,
        )

    async def ArchiveVersions(
        self, request: registry_pb2.ArchiveVersionsRequest, context: Any
    ) -> registry_pb2.ArchiveVersionsResponse:
        resource = f"adapter:{request.adapter}"
        team = await self._adapter_team(request.adapter)
        await self._require("ArchiveVersions", resource, team, Role.releaser)
        return await self._audited(
            "ArchiveVersions",
            resource,
            request.adapter,
            self._retention.archive_versions,
            request.adapter,
            request.keep_last,
            request.dry_run,
        )

    async def GarbageCollectArtifacts(
        self, request: registry_pb2.GarbageCollectArtifactsRequest, context: Any
    ) -> registry_pb2.GarbageCollectArtifactsResponse:
        # Blobs are shared by every team: only a platform admin collects them.
        await self._allow(
            "GarbageCollectArtifacts",
            "artifact:",
            "",
            lambda: auth.require_platform_admin(action="GarbageCollectArtifacts"),
        )
        return await self._audited(
            "GarbageCollectArtifacts",
            "artifact:",
            "",
            self._retention.collect_artifacts,
            request.dry_run,
        )

    # -- teams and keys --------------------------------------------------------------

    async def CreateTeam(
        self, request: registry_pb2.CreateTeamRequest, context: Any
    ) -> registry_pb2.Team:
        resource = f"team:{request.name}"
        await self._allow(
            "CreateTeam",
            resource,
            request.name,
            lambda: auth.require_platform_admin(action="CreateTeam"),
        )
        return await self._audited(
            "CreateTeam",
            resource,
            "",
            self._keys.create_team,
            request.name,
            request.description,
            team=request.name,
        )

    async def ListTeams(
        self, request: registry_pb2.ListTeamsRequest, context: Any
    ) -> registry_pb2.ListTeamsResponse:
        return await self._db.run(self._keys.list_teams, self._visible_teams(auth.current()))

    async def CreateApiKey(
        self, request: registry_pb2.CreateApiKeyRequest, context: Any
    ) -> registry_pb2.CreateApiKeyResponse:
        roles = [(r.team, _role(r)) for r in request.roles]
        if request.platform_admin:
            await self._allow(
                "CreateApiKey",
                "key:",
                "",
                lambda: auth.require_platform_admin(action="CreateApiKey with platform_admin"),
            )
        for team, _ in roles:
            # A team admin hands out roles in its own teams only.
            await self._require("CreateApiKey", f"team:{team}", team, Role.admin)
        if not roles and not request.platform_admin:
            raise InvalidArgument("CreateApiKey needs at least one role (team and role)")
        expires = (
            convert.as_utc(request.expires_at.ToDatetime())
            if request.HasField("expires_at")
            else None
        )
        return await self._audited(
            "CreateApiKey",
            "key:",
            "",
            self._create_key,
            request.name,
            roles,
            request.platform_admin,
            expires,
            team=roles[0][0] if roles else "",
        )

    def _create_key(
        self, name: str, roles: list[tuple[str, Role]], admin: bool, expires: Any
    ) -> registry_pb2.CreateApiKeyResponse:
        return self._keys.create_key(name, roles, platform_admin=admin, expires_at=expires)

    async def ListApiKeys(
        self, request: registry_pb2.ListApiKeysRequest, context: Any
    ) -> registry_pb2.ListApiKeysResponse:
        p = auth.current()
        if request.team:
            await self._require("ListApiKeys", f"team:{request.team}", request.team, Role.admin)
            teams: frozenset[str] | None = frozenset({request.team})
        elif p.platform_admin:
            teams = None
        else:
            teams = p.teams(Role.admin)
            if not teams:
                await self._allow(
                    "ListApiKeys",
                    "key:",
                    "",
                    lambda: auth.require_any_team(Role.admin, action="ListApiKeys"),
                )
        return await self._db.run(self._keys.list_keys, teams, request.include_revoked)

    async def RevokeApiKey(
        self, request: registry_pb2.RevokeApiKeyRequest, context: Any
    ) -> registry_pb2.ApiKey:
        resource = f"key:{request.key_id}"
        if not auth.KEY_ID_RE.match(request.key_id):
            raise InvalidArgument(
                f"key_id {request.key_id!r} is not a key id (16 hex characters: the part "
                "after 'ftk_')"
            )
        key = await self._db.run(self._keys.get_key, request.key_id)
        p = auth.current()
        if p.key_id != key.key_id:  # any key may revoke itself (a leaked key, say)
            if key.platform_admin or not key.roles:
                await self._allow(
                    "RevokeApiKey",
                    resource,
                    "",
                    lambda: auth.require_platform_admin(action="RevokeApiKey of a platform admin"),
                )
            for r in key.roles:
                # Only someone who administers every team the key works for.
                await self._require("RevokeApiKey", resource, r.team, Role.admin)
        revoked = await self._audited(
            "RevokeApiKey", resource, "", self._keys.revoke_key, request.key_id
        )
        if self._key_changed is not None:
            await self._key_changed(request.key_id, True)
        return revoked

    async def Authenticate(
        self, request: registry_pb2.AuthenticateRequest, context: Any
    ) -> registry_pb2.Principal:
        try:
            principal = await self.resolve_key(request.api_key, "Authenticate")
        except Unauthenticated as exc:
            # Audited (aggregated) under the key checked, not the asking service's.
            note_denial(exc, "Authenticate", key_id=denials.key_id_of(request.api_key))
            raise
        return auth.principal_to_proto(principal)

    async def resolve_key(self, key: str, method: str) -> AuthPrincipal:
        """The registry's own resolver (its auth interceptor and ``Authenticate``). A
        refused key is audited by the runtime, aggregated, under the presented key's id:
        a flood of bad keys costs no database write per call."""
        if not key:
            raise Unauthenticated(auth.MISSING_KEY)
        return await self._db.run(self._keys.resolve, key)


def _role(r: registry_pb2.TeamRole) -> Role:
    if not r.team:
        raise InvalidArgument("every role needs a team")
    if r.role == registry_pb2.ROLE_UNSPECIFIED:
        raise InvalidArgument(
            f"team {r.team!r}: role is required (viewer, trainer, releaser or admin)"
        )
    return auth.role_from_proto(r.role)
