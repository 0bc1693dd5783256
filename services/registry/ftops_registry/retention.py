"""Retention: archive old versions, then garbage-collect the artifacts nothing needs.

Archiving is metadata only (the version stays listed and its lineage readable); it is what
lets ``collect_artifacts`` delete the artifact. The rules both follow:

* never archive a version an alias points at, nor the stable or candidate version of a
  release still running (traffic may be on it); parents of kept versions may be archived;
* never collect an artifact that a non-archived version references (adapter, replay or
  dataset artifact), that an unfinished job record needs (its dataset, or the artifacts
  of the version it continues from), or that is younger than the grace period (uploaded
  moments ago, its version not registered yet);
* a collected artifact's row stays, marked deleted (archived versions reference it); a
  blob goes only when no live artifact lists it (artifacts share blobs by sha256),
  only after the collecting transaction committed (a rollback must not lose bytes), and
  not when it was (re)written within the grace period (an upload about to use it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2
from ftops.trainer.v1 import trainer_pb2
from ftops_registry import audit
from ftops_registry.artifacts import ArtifactStore
from ftops_registry.db import Database
from ftops_registry.models import (
    AdapterRow,
    AliasRow,
    ArtifactFileRow,
    ArtifactRow,
    JobRow,
    ReleaseRow,
    VersionRow,
    utcnow,
)
from ftops_registry.registry import VERSION_ID_RE, check_name
from ftops_registry.releases import RUNNING
from ftops_runtime.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

FINISHED_JOB_STATES = (
    events_pb2.JOB_STATE_SUCCEEDED,
    events_pb2.JOB_STATE_FAILED,
    events_pb2.JOB_STATE_CANCELLED,
    events_pb2.JOB_STATE_REJECTED,
)


@dataclass(frozen=True)
class _Collected:
    artifact_ids: list[str]
    blobs: dict[str, int]  # sha256 -> size of the blobs no live artifact lists


class Retention:
    def __init__(self, db: Database, store: ArtifactStore, *, gc_grace: timedelta) -> None:
        self.db = db
        self.store = store
        self.gc_grace = gc_grace

    def archive_versions(
        self, adapter: str, keep_last: int, dry_run: bool
    ) -> registry_pb2.ArchiveVersionsResponse:
        check_name("adapter", adapter)
        if keep_last < 1:
            # 0 would archive every unprotected version: almost surely a missing field.
            raise InvalidArgument("keep_last must be at least 1")

        def work(s: Session) -> list[str]:
            # Locks the adapter (Postgres) so no version is registered half way through.
            adapter_row = s.get(AdapterRow, adapter, with_for_update=True)
            if adapter_row is None:
                raise NotFound(f"adapter {adapter!r} does not exist")
            # Lock the versions before reading aliases: SetAlias locks its target version,
            # so an alias committed meanwhile is visible to the alias query below.
            rows = s.scalars(
                select(VersionRow)
                .where(VersionRow.adapter == adapter)
                .order_by(VersionRow.number.desc())
                .with_for_update()
            ).all()
            protected = set(
                s.scalars(select(AliasRow.version_id).where(AliasRow.adapter == adapter))
            )
            for release in s.scalars(select(ReleaseRow).where(ReleaseRow.state == RUNNING)):
                protected.update((release.stable_version_id, release.candidate_version_id))
            chosen = [
                r for r in rows[keep_last:] if not r.archived and r.version_id not in protected
            ]
            if not dry_run:
                for r in chosen:
                    r.archived = True
                ids = " ".join(r.version_id for r in chosen) or "nothing"
                audit.record(
                    s,
                    "ArchiveVersions",
                    f"adapter:{adapter}",
                    team=adapter_row.team,
                    detail=f"keep_last={keep_last}: archived {ids}",
                )
                s.flush()
            return [r.version_id for r in chosen]

        ids = self.db.write(work)
        if ids and not dry_run:
            log.info("adapter %s: archived %d versions", adapter, len(ids))
        return registry_pb2.ArchiveVersionsResponse(archived_version_ids=ids)

    def collect_artifacts(self, dry_run: bool) -> registry_pb2.GarbageCollectArtifactsResponse:
        def work(s: Session) -> _Collected:
            cutoff = utcnow() - self.gc_grace
            # Lock first, then read what is needed: RegisterVersion share-locks the
            # artifacts it references, so a version registered concurrently either is
            # visible to the query below or waits and then finds its artifact collected.
            rows = s.scalars(
                select(ArtifactRow)
                .where(ArtifactRow.created_at < cutoff, ArtifactRow.deleted_at.is_(None))
                .order_by(ArtifactRow.artifact_id)
                .with_for_update()
            ).all()
            needed = _needed_artifacts(s)
            doomed = [r for r in rows if r.artifact_id not in needed]
            ids = [r.artifact_id for r in doomed]
            if not ids:
                return _Collected([], {})
            doomed_blobs: dict[str, int] = {
                sha: size
                for sha, size in s.execute(
                    select(ArtifactFileRow.sha256, ArtifactFileRow.size).where(
                        ArtifactFileRow.artifact_id.in_(ids)
                    )
                )
            }
            kept_blobs = set(
                s.scalars(
                    select(ArtifactFileRow.sha256)
                    .join(ArtifactRow, ArtifactRow.artifact_id == ArtifactFileRow.artifact_id)
                    .where(
                        ArtifactRow.deleted_at.is_(None),
                        ArtifactFileRow.artifact_id.not_in(ids),
                        ArtifactFileRow.sha256.in_(list(doomed_blobs)),
                    )
                )
            )
            collected = _Collected(
                ids, {sha: n for sha, n in doomed_blobs.items() if sha not in kept_blobs}
            )
            if not dry_run:
                now = utcnow()
                for r in doomed:
                    r.deleted_at = now
                audit.record(
                    s,
                    "GarbageCollectArtifacts",
                    "artifact:",
                    detail=f"deleted {' '.join(ids)}; {len(collected.blobs)} blobs",
                )
            return collected

        # A blob written within the grace period may belong to an upload whose artifact is
        # not recorded yet (uploads write blobs first): it stays.
        written_before = time.time() - self.gc_grace.total_seconds()
        collected = self.db.write(work)
        if dry_run:
            freed = sum(collected.blobs.values())  # by the manifests' sizes
        else:
            freed = sum(
                self.store.delete(sha, written_before=written_before) for sha in collected.blobs
            )
            if collected.artifact_ids:
                log.info(
                    "collected %d artifacts, %d blobs, %d bytes",
                    len(collected.artifact_ids),
                    len(collected.blobs),
                    freed,
                )
        return registry_pb2.GarbageCollectArtifactsResponse(
            deleted_artifact_ids=collected.artifact_ids, freed_bytes=freed
        )


def _needed_artifacts(s: Session) -> set[str]:
    needed: set[str] = set()
    for artifact_id, replay, dataset in s.execute(
        select(
            VersionRow.artifact_id, VersionRow.replay_artifact_id, VersionRow.dataset_artifact_id
        ).where(VersionRow.archived.is_(False))
    ):
        needed.update(a for a in (artifact_id, replay, dataset) if a)
    for blob in s.scalars(select(JobRow.job).where(JobRow.state.not_in(FINISHED_JOB_STATES))):
        job = trainer_pb2.Job.FromString(blob)
        if job.spec.dataset_artifact_id:
            needed.add(job.spec.dataset_artifact_id)
        parent = _resolve(s, job.spec.parent_version_id)
        if parent is not None:  # the job continues from it, archived or not
            needed.update(
                a
                for a in (parent.artifact_id, parent.replay_artifact_id, parent.dataset_artifact_id)
                if a
            )
    return needed


def _resolve(s: Session, ref: str) -> VersionRow | None:
    if not ref:
        return None
    if ":" in ref:
        adapter, _, number = ref.rpartition(":")
        if not number.isdigit():
            return None
        return s.scalar(
            select(VersionRow).where(
                VersionRow.adapter == adapter, VersionRow.number == int(number)
            )
        )
    return s.get(VersionRow, ref) if VERSION_ID_RE.match(ref) else None
