"""The audit log in the core: entries commit with their mutation and only with it, the
actor comes from the runtime's ``current_principal``, and listing filters and pages."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from ftops.registry.v1 import registry_pb2
from ftops_registry.artifacts import FileSpec
from ftops_registry.audit import AuditLog
from ftops_registry.db import Database
from ftops_registry.models import utcnow
from ftops_registry.registry import Registry
from ftops_runtime.errors import FailedPrecondition, InvalidArgument
from ftops_runtime.interceptors import Principal, current_principal


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path}/registry.db")
    db.migrate()
    yield db
    db.close()


def test_entries_commit_with_their_mutation_only(db: Database) -> None:
    registry, log = Registry(db), AuditLog(db)
    token = current_principal.set(Principal(key_id="k-123"))
    try:
        registry.register_base_model("tiny", "a" * 64, "/m")
        # Refused inside the transaction: the change and its entry both roll back.
        with pytest.raises(FailedPrecondition):
            registry.register_base_model("tiny", "b" * 64, "/m")
        artifact = registry.record_artifact([FileSpec("a.bin", "1" * 64, 3)])
        version = registry.register_version(
            registry_pb2.RegisterVersionRequest(
                adapter="bot", team="t1", base_model="tiny", artifact_id=artifact.artifact_id
            )
        )
    finally:
        current_principal.reset(token)
    registry.set_alias("bot", "prod", version.version_id)  # no caller: anonymous

    entries = log.list().entries
    assert [(e.method, e.actor, e.team) for e in reversed(entries)] == [
        ("RegisterBaseModel", "k-123", ""),
        ("UploadArtifact", "k-123", ""),
        ("RegisterVersion", "k-123", "t1"),
        ("SetAlias", "anonymous", "t1"),
    ]
    assert entries[0].resource == "alias:bot/prod"
    assert entries[1].resource == f"version:{version.version_id}"


def test_list_filters_and_pages(db: Database) -> None:
    registry, log = Registry(db), AuditLog(db)
    registry.register_base_model("tiny", "a" * 64, "/m")
    artifact = registry.record_artifact([FileSpec("a.bin", "1" * 64, 3)])
    for team in ("a", "b"):
        for _ in range(3):
            registry.register_version(
                registry_pb2.RegisterVersionRequest(
                    adapter=f"bot-{team}",
                    team=team,
                    base_model="tiny",
                    artifact_id=artifact.artifact_id,
                )
            )
    log.record_failure("SetAlias", "alias:bot-a/x", "NOT_FOUND", "no such version", "bot-a")

    team_a = log.list(team="a").entries
    assert len(team_a) == 4
    assert team_a[0].outcome == "NOT_FOUND"
    assert len(log.list(resource_prefix="alias:").entries) == 1
    assert not log.list(resource_prefix="alias%").entries  # LIKE wildcards are literal
    assert len(log.list(since=utcnow() - timedelta(minutes=1)).entries) == 9
    assert not log.list(since=utcnow() + timedelta(minutes=1)).entries

    first = log.list(team="a", size=3)
    second = log.list(team="a", size=3, token=first.next_page_token)
    assert [e.id for e in first.entries] + [e.id for e in second.entries] == [e.id for e in team_a]
    assert not second.next_page_token
    with pytest.raises(InvalidArgument):
        log.list(token="bogus")
