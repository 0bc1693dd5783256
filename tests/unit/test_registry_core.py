"""Registry core on a real SQLite file: registration, numbering, idempotency, lineage,
aliases, rejected versions, argument checks and schema migrations."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ftops.common.v1 import common_pb2
from ftops.registry.v1 import registry_pb2
from ftops_registry.artifacts import FileSpec
from ftops_registry.db import MIGRATIONS_DIR, Database
from ftops_registry.models import Base
from ftops_registry.registry import Registry
from ftops_runtime.errors import FailedPrecondition, InvalidArgument, NotFound

FP = "a" * 64
FILES = [
    FileSpec("adapter_config.json", "1" * 64, 10),
    FileSpec("adapter_model.safetensors", "2" * 64, 20),
]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    db = Database(f"sqlite:///{tmp_path}/sub/registry.db")
    db.migrate()
    yield Registry(db)
    db.close()


def register(
    reg: Registry, adapter: str = "support-bot", parent: str = "", key: str = "", **kw: str
) -> registry_pb2.Version:
    return reg.register_version(
        registry_pb2.RegisterVersionRequest(
            adapter=adapter,
            team="support",
            base_model="tiny",
            parent_version_id=parent,
            artifact_id=kw.pop("artifact_id", "") or reg.record_artifact(FILES).artifact_id,
            job_id="job-1",
            method="lora",
            metrics={"loss": 0.5},
            labels={"k": "v"},
            idempotency_key=key,
        )
    )


@pytest.fixture
def with_base(registry: Registry) -> Registry:
    registry.register_base_model("tiny", FP, "/models/tiny")
    return registry


def test_migrate_twice_is_harmless_and_creates_parent_dir(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/a/b/r.db")
    db.migrate()
    db.migrate()
    assert (tmp_path / "a" / "b" / "r.db").exists()
    assert db.ping()
    db.close()


def test_base_model_idempotent_and_conflicting_fingerprint(registry: Registry) -> None:
    first = registry.register_base_model("tiny", FP, "/models/tiny")
    again = registry.register_base_model("tiny", FP.upper(), "/elsewhere/tiny")
    assert again.fingerprint == first.fingerprint
    assert again.uri == "/elsewhere/tiny"
    assert registry.get_base_model("tiny").uri == "/elsewhere/tiny"
    with pytest.raises(FailedPrecondition, match="tiny"):
        registry.register_base_model("tiny", "b" * 64, "/models/tiny")
    with pytest.raises(NotFound, match="nope"):
        registry.get_base_model("nope")
    with pytest.raises(InvalidArgument, match="fingerprint"):
        registry.register_base_model("tiny2", "xyz", "/m")


def test_versions_are_numbered_per_adapter_with_files(with_base: Registry) -> None:
    v1 = register(with_base)
    v2 = register(with_base)
    other = register(with_base, adapter="other-bot")
    assert (v1.number, v2.number, other.number) == (1, 2, 1)
    assert v1.version_id.startswith("ver_")
    assert v1.version_id != v2.version_id
    assert v1.base_model == "tiny"
    assert v1.base_model_fingerprint == FP
    assert v1.team == "support"
    assert [f.path for f in v1.files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert dict(v1.metrics) == {"loss": 0.5}
    assert dict(v1.labels) == {"k": "v"}
    assert with_base.get_version("support-bot:2").version_id == v2.version_id
    assert with_base.get_version(v1.version_id).number == 1


def test_concurrent_registrations_get_consecutive_numbers(with_base: Registry) -> None:
    artifact_id = with_base.record_artifact(FILES).artifact_id
    numbers: list[int] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            numbers.append(register(with_base, artifact_id=artifact_id).number)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(numbers) == list(range(1, 11))


def test_idempotency_key_returns_the_first_version(with_base: Registry) -> None:
    first = register(with_base, key="job-1-final")
    again = register(with_base, key="job-1-final")
    assert again.version_id == first.version_id
    assert register(with_base).number == 2
    with pytest.raises(FailedPrecondition, match="job-1-final"):
        register(with_base, adapter="other-bot", key="job-1-final")


def test_registration_preconditions(registry: Registry) -> None:
    with pytest.raises(NotFound, match="tiny"):
        register(registry)
    registry.register_base_model("tiny", FP, "/models/tiny")
    with pytest.raises(FailedPrecondition, match="deadbeef"):
        register(registry, artifact_id="deadbeef")
    with pytest.raises(NotFound, match="ver_0000000000"):
        register(registry, parent="ver_0000000000")
    other = register(registry, adapter="other-bot")
    with pytest.raises(FailedPrecondition, match="other-bot"):
        register(registry, parent=other.version_id)
    registry.register_base_model("tiny-2", "c" * 64, "/models/tiny2")
    req = registry_pb2.RegisterVersionRequest(
        adapter="other-bot", base_model="tiny-2", artifact_id=other.artifact_id
    )
    with pytest.raises(FailedPrecondition, match="tiny"):
        registry.register_version(req)


@pytest.mark.parametrize("name", ["", "a:b", "a/b", "../x", "-x", "base", "x" * 200, "a b"])
def test_bad_adapter_names_are_refused(with_base: Registry, name: str) -> None:
    with pytest.raises(InvalidArgument):
        register(with_base, adapter=name)


def test_lineage_walks_back_to_the_first_ancestor(with_base: Registry) -> None:
    v1 = register(with_base)
    v2 = register(with_base, parent=v1.version_id)
    v3 = register(with_base, parent="support-bot:2")
    lineage = with_base.get_lineage(v3.version_id)
    assert [v.version_id for v in lineage.chain] == [v3.version_id, v2.version_id, v1.version_id]
    assert lineage.base_model.name == "tiny"
    assert lineage.base_model.fingerprint == FP


def test_alias_moves_are_recorded(with_base: Registry) -> None:
    v1 = register(with_base)
    v2 = register(with_base)
    with_base.set_alias("support-bot", "prod", v1.version_id)
    with_base.set_alias("support-bot", "prod", v1.version_id)  # no move, no record
    moved = with_base.set_alias("support-bot", "prod", "support-bot:2")
    assert moved.version_id == v2.version_id
    assert with_base.get_alias("support-bot", "prod").version_id == v2.version_id
    assert with_base.alias_history("support-bot", "prod") == [
        (None, v1.version_id),
        (v1.version_id, v2.version_id),
    ]
    other = register(with_base, adapter="other-bot")
    with pytest.raises(FailedPrecondition):
        with_base.set_alias("support-bot", "prod", other.version_id)
    with pytest.raises(NotFound, match="staging"):
        with_base.get_alias("support-bot", "staging")
    with pytest.raises(NotFound, match="ghost"):
        with_base.set_alias("ghost", "prod", v1.version_id)


def test_list_versions_pages(with_base: Registry) -> None:
    for _ in range(5):
        register(with_base)
    seen: list[int] = []
    token = ""
    while True:
        page = with_base.list_versions("support-bot", 2, token)
        seen += [v.number for v in page.versions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [1, 2, 3, 4, 5]
    with pytest.raises(InvalidArgument, match="page_token"):
        with_base.list_versions("support-bot", 2, "garbage")
    with pytest.raises(NotFound):
        with_base.list_versions("ghost")


def test_unknown_versions_are_not_found(with_base: Registry) -> None:
    with pytest.raises(NotFound, match="ver_123456789"):
        with_base.get_version("ver_123456789")
    with pytest.raises(NotFound, match="support-bot:9"):
        with_base.get_version("support-bot:9")
    with pytest.raises(InvalidArgument):
        with_base.get_version("support-bot:x")
    with pytest.raises(NotFound, match="nonsense"):
        with_base.get_version("nonsense")


def gate_failed(**kw: object) -> registry_pb2.RegisterVersionRequest:
    evaluation = common_pb2.Evaluation(
        gate_passed=False,
        reasons=["retention 0.80 < 0.95"],
        metrics={"retention": 0.8, "new_loss": float("nan"), "parent_new_loss": float("inf")},
    )
    req = registry_pb2.RegisterVersionRequest(
        adapter="support-bot",
        team="support",
        base_model="tiny",
        job_id="job-9",
        rejected=True,
        evaluation=evaluation,
    )
    for field, value in kw.items():
        setattr(req, field, value)
    return req


def test_rejected_version_is_stored_listed_and_never_aliased(with_base: Registry) -> None:
    good = register(with_base)
    artifact = with_base.record_artifact(FILES).artifact_id
    replay = with_base.record_artifact([FileSpec("replay.jsonl", "3" * 64, 5)]).artifact_id
    data = with_base.record_artifact([FileSpec("data.jsonl", "4" * 64, 7)]).artifact_id
    rejected = with_base.register_version(
        gate_failed(
            artifact_id=artifact,
            replay_artifact_id=replay,
            dataset_artifact_id=data,
            parent_version_id=good.version_id,
            idempotency_key="job-9-final",
        )
    )
    assert (good.state, rejected.state) == ("ready", "rejected")
    assert not good.HasField("evaluation")
    assert (rejected.replay_artifact_id, rejected.dataset_artifact_id) == (replay, data)
    assert list(rejected.evaluation.reasons) == ["retention 0.80 < 0.95"]
    metrics = rejected.evaluation.metrics
    assert metrics["retention"] == 0.8
    assert math.isnan(metrics["new_loss"])
    assert math.isinf(metrics["parent_new_loss"])
    assert with_base.get_version(rejected.version_id) == rejected
    assert with_base.get_lineage(rejected.version_id).chain[0] == rejected
    listed = with_base.list_versions("support-bot").versions
    assert [(v.number, v.state) for v in listed] == [(1, "ready"), (2, "rejected")]
    assert listed[1] == rejected
    # A retried registration returns the same rejected version, not a new number.
    again = with_base.register_version(
        gate_failed(artifact_id=artifact, idempotency_key="job-9-final")
    )
    assert again == rejected

    with pytest.raises(FailedPrecondition, match=r"rejected .*retention 0\.80 < 0\.95"):
        with_base.set_alias("support-bot", "prod", rejected.version_id)
    with pytest.raises(FailedPrecondition, match="support-bot:2"):
        with_base.set_alias("support-bot", "prod", "support-bot:2")
    with pytest.raises(NotFound):
        with_base.get_alias("support-bot", "prod")
    assert with_base.alias_history("support-bot", "prod") == []
    with_base.set_alias("support-bot", "prod", good.version_id)  # ready versions still may


def test_referenced_artifacts_must_exist(with_base: Registry) -> None:
    artifact = with_base.record_artifact(FILES).artifact_id
    for field in ("replay_artifact_id", "dataset_artifact_id"):
        with pytest.raises(FailedPrecondition, match=f"{'ab' * 32}.*{field}"):
            with_base.register_version(gate_failed(artifact_id=artifact, **{field: "ab" * 32}))
    with pytest.raises(NotFound):
        with_base.list_versions("support-bot")


def _alembic(conn: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


def test_a_0001_database_upgrades_and_old_versions_are_ready(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/old.db")
    with db.engine.connect() as conn:
        command.upgrade(_alembic(conn), "0001")
        conn.commit()
    old = "2024-01-01 00:00:00.000000"
    with db.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO base_models VALUES ('tiny', :fp, '/models/tiny', :t)"),
            {"fp": FP, "t": old},
        )
        conn.execute(
            text("INSERT INTO adapters VALUES ('old-bot', 't', 'tiny', 1, :t)"), {"t": old}
        )
        conn.execute(text("INSERT INTO artifacts VALUES (:a, 30, :t)"), {"a": "f" * 64, "t": old})
        conn.execute(
            text(
                "INSERT INTO versions (version_id, adapter, number, artifact_id, "
                "base_model_fingerprint, job_id, dataset_fingerprint, method, metrics, labels, "
                "archived, created_at) VALUES ('ver_0123456789', 'old-bot', 1, :a, :fp, 'j', "
                "'', 'lora', '{\"loss\": 0.5}', '{}', 0, :t)"
            ),
            {"a": "f" * 64, "fp": FP, "t": old},
        )
        # An alias references the row: the upgrade must not rebuild `versions` under it.
        conn.execute(
            text("INSERT INTO aliases VALUES ('old-bot', 'prod', 'ver_0123456789', :t)"),
            {"t": old},
        )
    db.migrate()
    registry = Registry(db)
    try:
        version = registry.get_version("old-bot:1")
        assert version.state == "ready"
        assert not version.HasField("evaluation")
        assert (version.replay_artifact_id, version.dataset_artifact_id) == ("", "")
        assert dict(version.metrics) == {"loss": 0.5}
        assert registry.get_alias("old-bot", "prod").version_id == "ver_0123456789"
        with db.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            assert current == ScriptDirectory.from_config(_alembic(conn)).get_current_head()
    finally:
        db.close()


def test_migrations_create_exactly_the_models(registry: Registry) -> None:
    with registry.db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
