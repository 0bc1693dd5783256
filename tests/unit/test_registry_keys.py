"""Teams and API keys in the registry core: validation, resolution, revocation, expiry,
the bootstrap admin key and ``ftops-registry bootstrap-admin``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from ftops_registry.__main__ import bootstrap_admin
from ftops_registry.db import Database
from ftops_registry.keys import Keys
from ftops_registry.models import ApiKeyRow, utcnow
from ftops_registry.registry import Registry
from ftops_runtime import auth
from ftops_runtime.auth import Role
from ftops_runtime.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path}/registry.db")
    db.migrate()
    yield db
    db.close()


@pytest.fixture
def keys(db: Database) -> Keys:
    k = Keys(db)
    k.create_team("alpha", "")
    k.create_team("beta", "")
    return k


def test_a_key_resolves_to_its_roles(keys: Keys) -> None:
    created = keys.create_key("alice", [("alpha", Role.admin), ("beta", Role.viewer)])
    p = keys.resolve(created.secret)
    assert p.key_id == created.key.key_id
    assert p.name == "alice"
    assert dict(p.roles) == {"alpha": Role.admin, "beta": Role.viewer}
    assert not p.platform_admin
    assert p.expires_at is None


@pytest.mark.parametrize(
    ("name", "roles", "admin", "error"),
    [
        ("", [("alpha", Role.viewer)], False, InvalidArgument),
        ("x\x00y", [("alpha", Role.viewer)], False, InvalidArgument),
        ("x" * 201, [("alpha", Role.viewer)], False, InvalidArgument),
        ("x", [], False, InvalidArgument),
        ("x", [("alpha", Role.viewer), ("alpha", Role.admin)], False, InvalidArgument),
        ("x", [("gamma", Role.viewer)], False, NotFound),
    ],
)
def test_bad_keys_are_refused_and_nothing_is_written(
    keys: Keys, name: str, roles: list[tuple[str, Role]], admin: bool, error: type[Exception]
) -> None:
    with pytest.raises(error):
        keys.create_key(name, roles, platform_admin=admin)
    assert not keys.list_keys(include_revoked=True).keys


def test_expiry_must_be_future_and_is_enforced(keys: Keys, db: Database) -> None:
    with pytest.raises(InvalidArgument, match="not in the future"):
        keys.create_key("x", [("alpha", Role.viewer)], expires_at=utcnow() - timedelta(1))
    created = keys.create_key("x", [("alpha", Role.viewer)], expires_at=utcnow() + timedelta(1))
    assert keys.resolve(created.secret).expires_at is not None
    with db.engine.begin() as conn:
        conn.execute(update(ApiKeyRow).values(expires_at=utcnow() - timedelta(seconds=1)))
    with pytest.raises(Unauthenticated, match="expired"):
        keys.resolve(created.secret)


def test_revocation_is_immediate_and_idempotent(keys: Keys) -> None:
    created = keys.create_key("x", [("alpha", Role.trainer)])
    first = keys.revoke_key(created.key.key_id)
    again = keys.revoke_key(created.key.key_id)
    assert first.revoked_at == again.revoked_at
    with pytest.raises(Unauthenticated, match="revoked"):
        keys.resolve(created.secret)
    assert not keys.list_keys(["alpha"]).keys
    assert keys.list_keys(["alpha"], include_revoked=True).keys[0].key_id == created.key.key_id
    with pytest.raises(NotFound):
        keys.revoke_key("0" * 16)


def test_wrong_secrets_and_strangers_are_unknown(keys: Keys) -> None:
    created = keys.create_key("x", [("alpha", Role.viewer)])
    keys.revoke_key(created.key.key_id)
    # Without the right secret nobody learns the key was revoked.
    with pytest.raises(Unauthenticated, match="unknown API key"):
        keys.resolve(f"ftk_{created.key.key_id}_{'A' * 43}")
    with pytest.raises(Unauthenticated, match="not an ftops API key"):
        keys.resolve("hunter2")


def test_listing_is_by_team(keys: Keys) -> None:
    a = keys.create_key("a", [("alpha", Role.viewer)])
    b = keys.create_key("b", [("beta", Role.viewer)])
    both = keys.create_key("ab", [("alpha", Role.viewer), ("beta", Role.admin)])
    assert {k.key_id for k in keys.list_keys(["alpha"]).keys} == {a.key.key_id, both.key.key_id}
    assert {k.key_id for k in keys.list_keys(["beta"]).keys} == {b.key.key_id, both.key.key_id}
    assert [t.name for t in keys.list_teams(["beta"]).teams] == ["beta"]
    with pytest.raises(AlreadyExists):
        keys.create_team("alpha", "")


def test_bootstrap_key_is_created_once_and_checked(keys: Keys) -> None:
    key = auth.new_api_key()[1]
    assert keys.bootstrap_admin(key) == (key, True)
    assert keys.bootstrap_admin(key) == (key, False)  # every restart: already there
    assert keys.resolve(key).platform_admin
    parsed = auth.parse_api_key(key)
    assert parsed is not None
    with pytest.raises(AlreadyExists, match="different secret"):
        keys.bootstrap_admin(f"ftk_{parsed.key_id}_{'B' * 43}")
    with pytest.raises(InvalidArgument, match="ftk_"):
        keys.bootstrap_admin("admin")
    generated, created = keys.bootstrap_admin()
    assert created
    assert keys.resolve(generated).platform_admin


def test_teams_pick_up_artifacts_their_versions_use(db: Database, keys: Keys) -> None:
    from ftops.registry.v1 import registry_pb2
    from ftops_registry import ownership
    from ftops_registry.artifacts import FileSpec

    registry = Registry(db)
    registry.register_base_model("tiny", "a" * 64, "/m")
    mine = registry.record_artifact([FileSpec("a.safetensors", "1" * 64, 3)], "alpha")
    loose = registry.record_artifact([FileSpec("b.safetensors", "2" * 64, 3)])
    registry.register_version(
        registry_pb2.RegisterVersionRequest(
            adapter="bot", team="beta", base_model="tiny", artifact_id=loose.artifact_id
        )
    )
    owners = ownership.artifact_teams(db, [mine.artifact_id, loose.artifact_id, "f" * 64])
    assert owners == {mine.artifact_id: {"alpha"}, loose.artifact_id: {"beta"}}
    assert ownership.adapter_team(db, "bot") == "beta"
    assert ownership.adapter_team(db, "nope") is None


def test_bootstrap_admin_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bootstrap_admin(["--print-only"]) == 0
    assert auth.parse_api_key(capsys.readouterr().out.strip()) is not None

    monkeypatch.setenv("FTOPS_DATABASE_URL", f"sqlite:///{tmp_path}/boot.db")
    assert bootstrap_admin(["--name", "ops"]) == 0
    key = capsys.readouterr().out.strip()
    db = Database(f"sqlite:///{tmp_path}/boot.db")
    try:
        principal = Keys(db).resolve(key)
        assert principal.platform_admin
        assert principal.name == "ops"
    finally:
        db.close()
