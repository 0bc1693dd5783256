"""The registry's core: base models, artifacts' metadata, versions, lineage and aliases.

Plain synchronous Python over a ``Database``; the gRPC servicer runs these methods on the
database thread pool. Methods return protobuf messages because that is what every caller
wants, and raise ``ftops_runtime.errors`` for the caller's mistakes.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftops.registry.v1 import registry_pb2
from ftops_registry import audit, convert
from ftops_registry.artifacts import FileSpec
from ftops_registry.db import Database
from ftops_registry.models import (
    AdapterRow,
    AliasEventRow,
    AliasRow,
    ArtifactFileRow,
    ArtifactRow,
    ArtifactTeamRow,
    BaseModelRow,
    VersionRow,
    utcnow,
)
from ftops_registry.paging import decode_token, encode_token
from ftops_runtime import hashing
from ftops_runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermanentEventError,
    PermissionDenied,
)

log = logging.getLogger(__name__)

# Adapter and alias names appear in "adapter:number" refs and routes: no ':' or '/'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Base model names may look like hub ids ("org/model").
BASE_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
VERSION_ID_RE = re.compile(r"^ver_[0-9a-f]{8,60}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# "base" names the bare base model in gateway routes; an adapter may not take it.
RESERVED_NAMES = frozenset({"base"})
# Version states: a rejected version failed the evaluation gate and is never served.
READY, REJECTED = "ready", "rejected"


class RejectedVersionError(FailedPrecondition, PermanentEventError):
    """A rejected version named as an alias or release target. FAILED_PRECONDITION over
    gRPC; permanent for an event handler too (a redelivery cannot make it servable)."""


def check_servable(row: VersionRow, role: str) -> None:
    if row.state == REJECTED:
        reasons = "; ".join((row.evaluation or {}).get("reasons", [])) or "no reason recorded"
        raise RejectedVersionError(
            f"version {row.adapter}:{row.number} ({row.version_id}) was rejected by the "
            f"evaluation gate ({reasons}) and cannot be the {role}"
        )


def check_name(kind: str, value: str, pattern: re.Pattern[str] = NAME_RE) -> str:
    if not pattern.match(value):
        raise InvalidArgument(
            f"{kind} {value!r} is not a valid name (letters, digits, '.', '_', '-'; "
            "starting with a letter or digit)"
        )
    return value


def new_version_id() -> str:
    return f"ver_{uuid.uuid4().hex[:20]}"


def page_size(requested: int) -> int:
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


class Registry:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- base models -----------------------------------------------------------------

    def register_base_model(
        self,
        name: str,
        fingerprint: str,
        uri: str,
        admin_teams: Collection[str] | None = None,
    ) -> registry_pb2.BaseModel:
        """Add a base model, or record the new place of an existing one. ``admin_teams``
        are the teams the caller administers (None: a platform admin). A base model that
        adapters of several teams, or of a team outside ``admin_teams``, train on is a
        platform resource: moving it would break their next jobs, so only a platform
        admin may. Registering it again unchanged is always allowed."""
        check_name("base model", name, BASE_MODEL_RE)
        fingerprint = fingerprint.strip().lower()
        if not FINGERPRINT_RE.match(fingerprint):
            raise InvalidArgument(
                f"base model {name!r}: fingerprint must be a sha256 hex digest "
                "(ftops_runtime.hashing.model_fingerprint), got {fingerprint!r}"
            )
        if not uri:
            raise InvalidArgument(f"base model {name!r}: uri is required")

        def work(s: Session) -> registry_pb2.BaseModel:
            row = s.get(BaseModelRow, name, with_for_update=True)
            if row is None:
                row = BaseModelRow(name=name, fingerprint=fingerprint, uri=uri, created_at=utcnow())
                s.add(row)
                s.flush()
                log.info("registered base model %s (%s)", name, fingerprint[:12])
            elif row.fingerprint != fingerprint:
                raise FailedPrecondition(
                    f"base model {name!r} is registered with fingerprint {row.fingerprint}, "
                    f"not {fingerprint}: a different model under the same name. "
                    "Register it under a new name."
                )
            elif row.uri != uri:
                if admin_teams is not None:
                    _check_may_move(s, name, admin_teams)
                # Same bytes, new place (a replica mounts it elsewhere): keep the newest path.
                row.uri = uri
            audit.record(
                s, "RegisterBaseModel", f"base_model:{name}", detail=f"{fingerprint} {uri}"
            )
            return convert.base_model(row)

        return self.db.write(work)

    def get_base_model(self, name: str) -> registry_pb2.BaseModel:
        if not name:
            raise InvalidArgument("base model name is required")
        with self.db.read() as s:
            row = s.get(BaseModelRow, name)
            if row is None:
                raise NotFound(f"base model {name!r} is not registered")
            return convert.base_model(row)

    # -- artifacts -------------------------------------------------------------------

    def record_artifact(self, files: Sequence[FileSpec], team: str = "") -> registry_pb2.Artifact:
        """Record an artifact whose blobs are stored (idempotent: same files, same id),
        usable by ``team`` from now on."""
        artifact_id = hashing.manifest_id([(f.path, f.sha256, f.size) for f in files])

        def work(s: Session) -> registry_pb2.Artifact:
            row = s.get(ArtifactRow, artifact_id)
            if row is not None and row.deleted_at is not None:
                # Garbage-collected, now uploaded again: the blobs are back.
                row.deleted_at = None
            elif row is None:
                row = ArtifactRow(
                    artifact_id=artifact_id,
                    total_bytes=sum(f.size for f in files),
                    created_at=utcnow(),
                )
                s.add(row)
                s.flush()
                for position, f in enumerate(files):
                    s.add(
                        ArtifactFileRow(
                            artifact_id=artifact_id,
                            path=f.path,
                            position=position,
                            sha256=f.sha256,
                            size=f.size,
                        )
                    )
                s.flush()
            if team:
                grant_artifact(s, artifact_id, team)
            audit.record(
                s,
                "UploadArtifact",
                f"artifact:{artifact_id}",
                team=team,
                detail=f"{row.total_bytes} bytes",
            )
            return convert.artifact(row, _files(s, artifact_id))

        return self.db.write(work)

    def get_artifact(self, artifact_id: str) -> registry_pb2.Artifact:
        if not artifact_id:
            raise InvalidArgument("artifact_id is required")
        with self.db.read() as s:
            row = s.get(ArtifactRow, artifact_id)
            if row is None:
                raise NotFound(f"artifact {artifact_id!r} does not exist (upload it first)")
            if row.deleted_at is not None:
                raise NotFound(
                    f"artifact {artifact_id!r} was garbage-collected (only archived versions "
                    "used it); upload it again to restore it"
                )
            return convert.artifact(row, _files(s, artifact_id))

    # -- versions --------------------------------------------------------------------

    def register_version(self, req: registry_pb2.RegisterVersionRequest) -> registry_pb2.Version:
        adapter_name = check_name("adapter", req.adapter)
        if adapter_name.lower() in RESERVED_NAMES:
            raise InvalidArgument(f"adapter name {adapter_name!r} is reserved")
        if not req.artifact_id:
            raise InvalidArgument(f"adapter {adapter_name!r}: artifact_id is required")
        if req.team:
            check_name("team", req.team)
        idem_key = req.idempotency_key or None
        state = REJECTED if req.rejected else READY
        evaluation = convert.evaluation_json(req.evaluation) if req.HasField("evaluation") else None

        def work(s: Session) -> registry_pb2.Version:
            if idem_key is not None:
                existing = s.scalar(
                    select(VersionRow).where(VersionRow.idempotency_key == idem_key)
                )
                if existing is not None:
                    if existing.adapter != adapter_name:
                        raise FailedPrecondition(
                            f"idempotency_key {idem_key!r} was used for adapter "
                            f"{existing.adapter!r} ({existing.version_id}), not {adapter_name!r}"
                        )
                    version = self._version_pb(s, existing)
                    audit.record(
                        s,
                        "RegisterVersion",
                        f"version:{existing.version_id}",
                        team=version.team,
                        detail=f"{adapter_name}:{existing.number} (idempotent repeat)",
                    )
                    return version

            # The row lock makes concurrent registrations take numbers one after another
            # (Postgres); SQLite's BEGIN IMMEDIATE already serializes writers.
            adapter = s.get(AdapterRow, adapter_name, with_for_update=True)
            if adapter is None:
                if not req.base_model:
                    raise InvalidArgument(
                        f"adapter {adapter_name!r} is new: base_model is required"
                    )
                base = s.get(BaseModelRow, req.base_model)
                if base is None:
                    raise NotFound(
                        f"base model {req.base_model!r} is not registered "
                        f"(needed by adapter {adapter_name!r})"
                    )
                adapter = AdapterRow(
                    name=adapter_name,
                    team=req.team,
                    base_model=base.name,
                    last_number=0,
                    created_at=utcnow(),
                )
                s.add(adapter)
                # A concurrent creator makes this flush fail; Database.write retries.
                s.flush()
            else:
                if req.base_model and req.base_model != adapter.base_model:
                    raise FailedPrecondition(
                        f"adapter {adapter_name!r} is trained on base model "
                        f"{adapter.base_model!r}, not {req.base_model!r}"
                    )
                if req.team and adapter.team and req.team != adapter.team:
                    raise FailedPrecondition(
                        f"adapter {adapter_name!r} belongs to team {adapter.team!r}, "
                        f"not {req.team!r}"
                    )
                base = s.get(BaseModelRow, adapter.base_model)
                if base is None:
                    raise NotFound(f"base model {adapter.base_model!r} is not registered")

            # Same code for every referenced artifact: the caller must upload it first.
            referenced = (
                ("artifact_id", req.artifact_id),
                ("replay_artifact_id", req.replay_artifact_id),
                ("dataset_artifact_id", req.dataset_artifact_id),
            )
            for field, artifact_id in referenced:
                # Shared lock: garbage collection (which locks artifacts for update) cannot
                # collect it before this version commits (Postgres).
                stored = (
                    s.get(ArtifactRow, artifact_id, with_for_update={"read": True})
                    if artifact_id
                    else None
                )
                if artifact_id and (stored is None or stored.deleted_at is not None):
                    raise FailedPrecondition(
                        f"artifact {artifact_id!r} ({field}) does not exist: upload it with "
                        "UploadArtifact before registering the version"
                    )
            parent_id: str | None = None
            if req.parent_version_id:
                parent = self._resolve(s, req.parent_version_id)
                if parent.adapter != adapter_name:
                    raise FailedPrecondition(
                        f"parent version {req.parent_version_id!r} belongs to adapter "
                        f"{parent.adapter!r}, not {adapter_name!r}"
                    )
                parent_id = parent.version_id

            if adapter.team:  # the team's versions use them: its members may download them
                for _, artifact_id in referenced:
                    if artifact_id:
                        grant_artifact(s, artifact_id, adapter.team)
            adapter.last_number += 1
            row = VersionRow(
                version_id=new_version_id(),
                adapter=adapter_name,
                number=adapter.last_number,
                parent_version_id=parent_id,
                artifact_id=req.artifact_id,
                base_model_fingerprint=base.fingerprint,
                job_id=req.job_id,
                dataset_fingerprint=req.dataset_fingerprint,
                method=req.method,
                metrics=convert.json_numbers(req.metrics),
                labels=dict(req.labels),
                idempotency_key=idem_key,
                archived=False,
                created_at=utcnow(),
                state=state,
                evaluation=evaluation,
                replay_artifact_id=req.replay_artifact_id or None,
                dataset_artifact_id=req.dataset_artifact_id or None,
            )
            s.add(row)
            s.flush()
            if state == REJECTED:
                log.warning(
                    "registered %s:%d as %s, REJECTED by the evaluation gate: %s",
                    adapter_name,
                    row.number,
                    row.version_id,
                    "; ".join(req.evaluation.reasons) or "no reason given",
                )
            else:
                log.info("registered %s:%d as %s", adapter_name, row.number, row.version_id)
            audit.record(
                s,
                "RegisterVersion",
                f"version:{row.version_id}",
                team=adapter.team,
                detail=f"{adapter_name}:{row.number} {state}",
            )
            return self._version_pb(s, row)

        return self.db.write(work)

    def get_version(self, ref: str) -> registry_pb2.Version:
        """``ref`` is a version id or "adapter:number"."""
        with self.db.read() as s:
            return self._version_pb(s, self._resolve(s, ref))

    def list_versions(
        self, adapter: str, size: int = 0, token: str = ""
    ) -> registry_pb2.ListVersionsResponse:
        check_name("adapter", adapter)
        after = decode_token(token)
        limit = page_size(size)
        with self.db.read() as s:
            adapter_row = s.get(AdapterRow, adapter)
            if adapter_row is None:
                raise NotFound(f"adapter {adapter!r} has no versions")
            rows = s.scalars(
                select(VersionRow)
                .where(VersionRow.adapter == adapter, VersionRow.number > after)
                .order_by(VersionRow.number)
                .limit(limit + 1)
            ).all()
            page = rows[:limit]
            files = _files_by_artifact(s, {r.artifact_id for r in page})
            return registry_pb2.ListVersionsResponse(
                versions=[convert.version(r, adapter_row, files[r.artifact_id]) for r in page],
                next_page_token=encode_token(page[-1].number) if len(rows) > limit else "",
            )

    def get_lineage(self, ref: str) -> registry_pb2.GetLineageResponse:
        with self.db.read() as s:
            row = self._resolve(s, ref)
            chain = [self._version_pb(s, row)]
            seen = {row.version_id}
            while row.parent_version_id:
                parent = s.get(VersionRow, row.parent_version_id)
                if parent is None or parent.version_id in seen:  # defensive: FKs forbid it
                    break
                seen.add(parent.version_id)
                chain.append(self._version_pb(s, parent))
                row = parent
            adapter = s.get(AdapterRow, row.adapter)
            assert adapter is not None
            base = s.get(BaseModelRow, adapter.base_model)
            return registry_pb2.GetLineageResponse(
                chain=chain, base_model=convert.base_model(base) if base else None
            )

    # -- aliases ---------------------------------------------------------------------

    def set_alias(self, adapter: str, name: str, version_ref: str) -> registry_pb2.Alias:
        check_name("adapter", adapter)
        check_name("alias", name)
        if not version_ref:
            raise InvalidArgument(f"alias {adapter}/{name}: version_id is required")

        def work(s: Session) -> registry_pb2.Alias:
            if s.get(AdapterRow, adapter) is None:
                raise NotFound(f"adapter {adapter!r} does not exist")
            # Locked: ArchiveVersions must not archive it between this check and commit.
            version = self._resolve(s, version_ref, lock=True)
            if version.archived:
                raise FailedPrecondition(
                    f"version {version.adapter}:{version.number} ({version.version_id}) is "
                    "archived (its artifact may be garbage-collected) and cannot be aliased"
                )
            if version.adapter != adapter:
                raise FailedPrecondition(
                    f"version {version.version_id} belongs to adapter {version.adapter!r}, "
                    f"so alias {name!r} of adapter {adapter!r} cannot point at it"
                )
            check_servable(version, f"target of alias {adapter}/{name}")
            now = utcnow()
            row = s.get(AliasRow, (adapter, name), with_for_update=True)
            previous = row.version_id if row is not None else None
            if row is None:
                row = AliasRow(adapter=adapter, name=name, version_id=version.version_id)
                s.add(row)
            if previous != version.version_id:
                row.version_id = version.version_id
                row.updated_at = now
                s.add(
                    AliasEventRow(
                        adapter=adapter,
                        name=name,
                        from_version_id=previous,
                        to_version_id=version.version_id,
                        moved_at=now,
                    )
                )
            s.flush()
            team_row = s.get(AdapterRow, adapter)
            audit.record(
                s,
                "SetAlias",
                f"alias:{adapter}/{name}",
                team=team_row.team if team_row is not None else "",
                detail=f"{previous or '-'} -> {version.version_id}",
            )
            return convert.alias(row)

        return self.db.write(work)

    def get_alias(self, adapter: str, name: str) -> registry_pb2.Alias:
        check_name("adapter", adapter)
        check_name("alias", name)
        with self.db.read() as s:
            row = s.get(AliasRow, (adapter, name))
            if row is None:
                raise NotFound(f"alias {name!r} of adapter {adapter!r} is not set")
            return convert.alias(row)

    def alias_history(self, adapter: str, name: str) -> list[tuple[str | None, str]]:
        """The moves of one alias, oldest first, as (from_version_id, to_version_id)."""
        with self.db.read() as s:
            rows = s.scalars(
                select(AliasEventRow)
                .where(AliasEventRow.adapter == adapter, AliasEventRow.name == name)
                .order_by(AliasEventRow.id)
            ).all()
            return [(r.from_version_id, r.to_version_id) for r in rows]

    # -- helpers ---------------------------------------------------------------------

    def _resolve(self, s: Session, ref: str, *, lock: bool = False) -> VersionRow:
        if not ref:
            raise InvalidArgument("a version id or 'adapter:number' is required")
        if ":" in ref:
            adapter, _, number_text = ref.rpartition(":")
            if not number_text.isdigit():
                raise InvalidArgument(
                    f"version name {ref!r} must be 'adapter:number', e.g. 'support-bot:3'"
                )
            query = select(VersionRow).where(
                VersionRow.adapter == adapter, VersionRow.number == int(number_text)
            )
            row = s.scalar(query.with_for_update() if lock else query)
        else:
            row = s.get(VersionRow, ref, with_for_update=lock) if VERSION_ID_RE.match(ref) else None
        if row is None:
            raise NotFound(f"version {ref!r} does not exist")
        return row

    def _version_pb(self, s: Session, row: VersionRow) -> registry_pb2.Version:
        adapter = s.get(AdapterRow, row.adapter)
        assert adapter is not None
        return convert.version(row, adapter, _files(s, row.artifact_id))


def _check_may_move(s: Session, name: str, admin_teams: Collection[str]) -> None:
    users = set(s.scalars(select(AdapterRow.team).where(AdapterRow.base_model == name).distinct()))
    if len(users) > 1 or not users <= set(admin_teams):
        # Which teams use it is theirs to know: say only why.
        raise PermissionDenied(
            f"base model {name!r} is used by adapters of several teams or of a team you do "
            "not administer: it is a platform resource, and only a platform admin may "
            "change where it is registered"
        )


def grant_artifact(s: Session, artifact_id: str, team: str) -> None:
    """Let ``team`` use and download the artifact (idempotent)."""
    if s.get(ArtifactTeamRow, (artifact_id, team)) is None:
        s.add(ArtifactTeamRow(artifact_id=artifact_id, team=team))
        s.flush()


def _files(s: Session, artifact_id: str) -> list[ArtifactFileRow]:
    return list(
        s.scalars(
            select(ArtifactFileRow)
            .where(ArtifactFileRow.artifact_id == artifact_id)
            .order_by(ArtifactFileRow.position)
        )
    )


def _files_by_artifact(s: Session, ids: set[str]) -> dict[str, list[ArtifactFileRow]]:
    out: dict[str, list[ArtifactFileRow]] = {i: [] for i in ids}
    if ids:
        rows = s.scalars(
            select(ArtifactFileRow)
            .where(ArtifactFileRow.artifact_id.in_(ids))
            .order_by(ArtifactFileRow.position)
        )
        for r in rows:
            out[r.artifact_id].append(r)
    return out


def file_specs(files: Sequence[Any]) -> list[FileSpec]:
    """``ArtifactFile`` messages to ``FileSpec``s."""
    return [FileSpec(path=f.path, sha256=f.sha256, size=int(f.size_bytes)) for f in files]
