"""Retention and artifact garbage collection on SQLite with a real blob store: the
never-touch rules (aliases, running releases, non-archived versions, unfinished jobs,
shared blobs), dry runs, and the audit entries both leave."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2
from ftops.trainer.v1 import trainer_pb2
from ftops_registry.artifacts import FileSpec, LocalArtifactStore, UploadSession
from ftops_registry.audit import AuditLog
from ftops_registry.db import Database
from ftops_registry.jobs import JobRecords
from ftops_registry.registry import Registry
from ftops_registry.releases import ReleaseHistory
from ftops_registry.retention import Retention
from ftops_runtime import events
from ftops_runtime.errors import FailedPrecondition, InvalidArgument, NotFound

FP = "a" * 64
SHARED = b'{"r": 8}'  # every artifact's config: one blob shared by all of them


@dataclass
class Env:
    db: Database
    store: LocalArtifactStore
    registry: Registry
    retention: Retention
    releases: ReleaseHistory
    jobs: JobRecords
    audit: AuditLog


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    db = Database(f"sqlite:///{tmp_path}/registry.db")
    db.migrate()
    store = LocalArtifactStore(tmp_path / "artifacts")
    registry = Registry(db)
    registry.register_base_model("tiny", FP, "/models/tiny")
    yield Env(
        db,
        store,
        registry,
        Retention(db, store, gc_grace=timedelta(0)),
        ReleaseHistory(db),
        JobRecords(db),
        AuditLog(db),
    )
    db.close()


def _spec(path: str, data: bytes) -> FileSpec:
    return FileSpec(path, hashlib.sha256(data).hexdigest(), len(data))


def artifact(env: Env, weights: bytes) -> str:
    files = [(_spec("adapter_config.json", SHARED), SHARED), (_spec("w.bin", weights), weights)]
    session = UploadSession(env.store, [s for s, _ in files])
    for index, (_, data) in enumerate(files):
        session.write(index, data)
    session.finish()
    return env.registry.record_artifact([s for s, _ in files]).artifact_id


def version(
    env: Env,
    n: int,
    *,
    parent_version_id: str = "",
    replay_artifact_id: str = "",
    dataset_artifact_id: str = "",
) -> registry_pb2.Version:
    return env.registry.register_version(
        registry_pb2.RegisterVersionRequest(
            adapter="bot",
            team="support",
            base_model="tiny",
            artifact_id=artifact(env, f"weights {n}".encode()),
            parent_version_id=parent_version_id,
            replay_artifact_id=replay_artifact_id,
            dataset_artifact_id=dataset_artifact_id,
        )
    )


def blob_exists(env: Env, data: bytes) -> bool:
    return env.store.exists(hashlib.sha256(data).hexdigest())


def test_archive_never_touches_aliased_or_released_versions(env: Env) -> None:
    v = [version(env, n) for n in range(1, 7)]
    env.registry.set_alias("bot", "prod", v[0].version_id)
    meta = events.new_meta("release-controller", "rc-1")
    env.releases.apply_started(
        events_pb2.ReleaseStarted(
            meta=meta,
            release_id="rel-1",
            alias="prod",
            stable_version_id=v[0].version_id,
            candidate_version_id=v[1].version_id,
        )
    )
    # A finished release protects nothing.
    env.releases.apply_started(
        events_pb2.ReleaseStarted(
            meta=events.new_meta("release-controller", "rc-1"),
            release_id="rel-0",
            alias="prod",
            stable_version_id=v[2].version_id,
            candidate_version_id=v[2].version_id,
        )
    )
    env.releases.apply_rollback(
        events_pb2.ReleaseRollback(
            meta=events.new_meta("release-controller", "rc-1"), release_id="rel-0"
        )
    )

    dry = env.retention.archive_versions("bot", 2, dry_run=True)
    assert list(dry.archived_version_ids) == [v[3].version_id, v[2].version_id]
    assert not env.registry.get_version(v[2].version_id).archived

    done = env.retention.archive_versions("bot", 2, dry_run=False)
    assert done.archived_version_ids == dry.archived_version_ids
    states = [env.registry.get_version(x.version_id).archived for x in v]
    assert states == [False, False, True, True, False, False]
    # Idempotent; archived versions stay readable, lineage included.
    assert not env.retention.archive_versions("bot", 2, dry_run=False).archived_version_ids
    assert env.registry.get_lineage(v[3].version_id).chain[0].version_id == v[3].version_id
    # An archived version cannot become an alias target (its artifact may go).
    with pytest.raises(FailedPrecondition, match="archived"):
        env.registry.set_alias("bot", "prod", v[2].version_id)

    with pytest.raises(InvalidArgument):
        env.retention.archive_versions("bot", 0, dry_run=False)
    with pytest.raises(NotFound):
        env.retention.archive_versions("nobody", 1, dry_run=False)

    entries = env.audit.list(resource_prefix="adapter:bot").entries
    assert [e.method for e in entries] == ["ArchiveVersions", "ArchiveVersions"]
    assert entries[1].team == "support"
    assert v[3].version_id in entries[1].detail


def test_parents_of_kept_versions_may_be_archived(env: Env) -> None:
    first = version(env, 1)
    second = version(env, 2, parent_version_id=first.version_id)
    assert list(env.retention.archive_versions("bot", 1, False).archived_version_ids) == [
        first.version_id
    ]
    chain = env.registry.get_lineage(second.version_id).chain
    assert [c.version_id for c in chain] == [second.version_id, first.version_id]
    assert chain[1].archived


def test_gc_deletes_only_what_nothing_needs(env: Env) -> None:
    replay = artifact(env, b"replay set")
    dataset = artifact(env, b"dataset")
    old = version(env, 1, replay_artifact_id=replay)
    parent_of_job = version(env, 2)
    kept = version(env, 3, dataset_artifact_id=dataset)
    orphan = artifact(env, b"never used")
    job_data = artifact(env, b"job dataset")
    done_job_data = artifact(env, b"finished job dataset")

    def job(job_id: str, state: int, **spec: str) -> None:
        env.jobs.put(
            trainer_pb2.Job(
                job_id=job_id,
                state=state,  # type: ignore[arg-type]
                spec=trainer_pb2.JobSpec(adapter="bot", **spec),  # type: ignore[arg-type]
            ),
            0,
        )

    job("running", events_pb2.JOB_STATE_RUNNING, dataset_artifact_id=job_data)
    job("queued", events_pb2.JOB_STATE_QUEUED, parent_version_id=parent_of_job.version_id)
    job("done", events_pb2.JOB_STATE_SUCCEEDED, dataset_artifact_id=done_job_data)
    env.retention.archive_versions("bot", 1, dry_run=False)  # archives old and parent_of_job

    dry = env.retention.collect_artifacts(dry_run=True)
    expected = sorted([old.artifact_id, replay, orphan, done_job_data])
    assert list(dry.deleted_artifact_ids) == expected
    assert dry.freed_bytes > 0
    env.registry.get_artifact(orphan)  # a dry run deletes nothing

    done = env.retention.collect_artifacts(dry_run=False)
    assert list(done.deleted_artifact_ids) == expected
    freed = (b"weights 1", b"replay set", b"never used", b"finished job dataset")
    assert done.freed_bytes == dry.freed_bytes == sum(len(b) for b in freed)
    for gone in expected:
        with pytest.raises(NotFound, match="garbage-collected"):
            env.registry.get_artifact(gone)
    # Never: non-archived versions' artifacts (adapter, dataset), unfinished jobs' inputs,
    # and the blob every artifact shares.
    for needed in (kept.artifact_id, dataset, job_data, parent_of_job.artifact_id):
        env.registry.get_artifact(needed)
    assert blob_exists(env, SHARED)
    assert blob_exists(env, b"weights 3")
    assert not blob_exists(env, b"weights 1")
    assert not blob_exists(env, b"replay set")
    # The archived version still reads (lineage), and nothing is collected twice.
    assert env.registry.get_version(old.version_id).archived
    assert not env.retention.collect_artifacts(dry_run=False).deleted_artifact_ids
    # New versions cannot use a collected artifact until it is uploaded again.
    with pytest.raises(FailedPrecondition):
        env.registry.register_version(
            registry_pb2.RegisterVersionRequest(adapter="bot", artifact_id=orphan)
        )
    assert artifact(env, b"never used") == orphan
    env.registry.get_artifact(orphan)

    audit = env.audit.list(resource_prefix="artifact:").entries
    assert [e.method for e in audit if e.method == "GarbageCollectArtifacts"] == [
        "GarbageCollectArtifacts"
    ]


def test_gc_grace_keeps_fresh_uploads(env: Env) -> None:
    artifact(env, b"just uploaded")
    patient = Retention(env.db, env.store, gc_grace=timedelta(hours=1))
    assert not patient.collect_artifacts(dry_run=False).deleted_artifact_ids
    assert blob_exists(env, b"just uploaded")


def test_scheduled_retention_keeps_the_newest_and_what_is_needed(env: Env) -> None:
    from ftops_registry.auto_retention import AutoRetention

    v = [version(env, n) for n in range(1, 7)]
    env.registry.set_alias("bot", "prod", v[0].version_id)  # the oldest, aliased
    auto = AutoRetention(env.db, env.retention, keep_last=2, interval_s=3600)
    done = auto.once()
    states = {x.version_id: x.archived for x in env.registry.list_versions("bot").versions}
    # v2..v4 archived; v5, v6 the newest two; v1 aliased.
    assert [states[x.version_id] for x in v] == [False, True, True, True, False, False]
    assert done.archived == 3
    assert done.collected == 3  # the archived versions' artifacts
    assert done.freed_bytes > 0
    assert not blob_exists(env, b"weights 2")
    assert blob_exists(env, b"weights 1")
    assert blob_exists(env, b"weights 6")
    assert blob_exists(env, SHARED)  # still listed by the kept artifacts
    # A second pass finds nothing more to do.
    assert auto.once() == type(done)(0, 0, 0)
