"""ftops_runtime.auth without a network: key format, roles, the authenticator's modes,
the TTL cache and the require helpers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ftops_runtime import auth
from ftops_runtime.auth import (
    DEVELOPMENT,
    NOBODY,
    AuthMode,
    AuthPrincipal,
    AuthSettings,
    CachedResolver,
    Role,
)
from ftops_runtime.errors import PermissionDenied, Unauthenticated
from ftops_runtime.interceptors import Principal, current_principal
from ftops_runtime.settings import ServiceSettings

ALPHA_TRAINER = AuthPrincipal(key_id="a" * 16, roles={"alpha": Role.trainer})


def test_keys_parse_back_and_only_the_hash_is_comparable() -> None:
    key_id, key = auth.new_api_key()
    parsed = auth.parse_api_key(key)
    assert parsed is not None
    assert parsed.key_id == key_id
    assert key == f"ftk_{key_id}_{parsed.secret}"
    stored = auth.hash_secret(parsed.secret)
    assert parsed.secret not in stored
    assert len(stored) == 64
    assert auth.secret_matches(parsed.secret, stored)
    assert not auth.secret_matches(parsed.secret + "x", stored)
    assert auth.new_api_key()[1] != key


@pytest.mark.parametrize(
    "key", ["", "ftk_", "ftk_abc_def", "xyz_0123456789abcdef_" + "a" * 43, "ftk_" + "0" * 16]
)
def test_malformed_keys_do_not_parse(key: str) -> None:
    assert auth.parse_api_key(key) is None


def test_key_from_metadata_accepts_bearer_and_header() -> None:
    assert auth.key_from_metadata({"authorization": "Bearer k1"}) == "k1"
    assert auth.key_from_metadata({"authorization": "bearer  k2 "}) == "k2"
    assert auth.key_from_metadata({"x-ftops-key": "k3"}) == "k3"
    assert auth.key_from_metadata({"authorization": "Basic zzz"}) == ""
    assert auth.key_from_metadata({}) == ""


@pytest.mark.parametrize(
    ("held", "allowed"),
    [
        (Role.viewer, {Role.viewer}),
        (Role.trainer, {Role.viewer, Role.trainer}),
        (Role.releaser, {Role.viewer, Role.releaser}),
        (Role.admin, set(Role)),
    ],
)
def test_roles_are_not_a_ladder(held: Role, allowed: set[Role]) -> None:
    assert {needed for needed in Role if auth.grants(held, needed)} == allowed


def test_principal_can_only_act_in_its_teams() -> None:
    assert ALPHA_TRAINER.can("alpha", Role.trainer)
    assert not ALPHA_TRAINER.can("alpha", Role.releaser)
    assert not ALPHA_TRAINER.can("beta", Role.viewer)
    assert not ALPHA_TRAINER.can("", Role.viewer)  # teamless: platform admins only
    assert DEVELOPMENT.can("", Role.admin)
    assert DEVELOPMENT.can("beta", Role.admin)
    assert ALPHA_TRAINER.teams(Role.trainer) == {"alpha"}
    assert ALPHA_TRAINER.teams(Role.releaser) == set()


def test_require_names_the_team_the_role_and_the_key() -> None:
    token = current_principal.set(ALPHA_TRAINER)
    try:
        assert auth.require("alpha", Role.trainer) is ALPHA_TRAINER
        with pytest.raises(PermissionDenied, match=r"releaser.*'alpha'.*has the trainer role"):
            auth.require("alpha", Role.releaser, action="SetAlias")
        with pytest.raises(PermissionDenied, match=r"'beta'.*has no role in that team"):
            auth.require("beta", Role.viewer)
        with pytest.raises(PermissionDenied, match="platform admin"):
            auth.require("", Role.viewer)
        with pytest.raises(PermissionDenied, match="platform-admin"):
            auth.require_platform_admin(action="CreateTeam")
        assert auth.require_any_team(Role.trainer) is ALPHA_TRAINER
        with pytest.raises(PermissionDenied, match="admin"):
            auth.require_any_team(Role.admin)
    finally:
        current_principal.reset(token)


def test_a_plain_principal_has_no_roles() -> None:
    token = current_principal.set(Principal(key_id="static-key"))
    try:
        assert auth.current().key_id == "static-key"
        with pytest.raises(PermissionDenied, match="static-key"):
            auth.require("alpha", Role.viewer)
    finally:
        current_principal.reset(token)


async def _never(key: str, method: str) -> AuthPrincipal:
    raise AssertionError("the resolver must not be asked")


async def test_disabled_mode_lets_everyone_in_as_admin() -> None:
    authenticate = auth.authenticator(_never, mode=AuthMode.disabled)
    assert await authenticate({}, "/svc/Method") is DEVELOPMENT


async def test_missing_key_is_unauthenticated_except_for_public_methods() -> None:
    authenticate = auth.authenticator(_never, public={"/svc/Public"})
    with pytest.raises(Unauthenticated, match="authorization: Bearer"):
        await authenticate({}, "/svc/Method")
    assert await authenticate({}, "/svc/Public") is NOBODY


async def test_an_expired_principal_is_refused_even_when_cached() -> None:
    expired = AuthPrincipal(key_id="b" * 16, expires_at=datetime.now(UTC) - timedelta(seconds=1))

    async def resolve(key: str, method: str) -> AuthPrincipal:
        return expired

    authenticate = auth.authenticator(CachedResolver(resolve, ttl_s=60))
    with pytest.raises(Unauthenticated, match="expired"):
        await authenticate({"x-ftops-key": "k"}, "/svc/Method")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_cache_keeps_answers_for_the_ttl_then_asks_again() -> None:
    clock = _Clock()
    calls: list[str] = []
    revoked: set[str] = set()

    async def resolve(key: str, method: str) -> AuthPrincipal:
        calls.append(key)
        if key in revoked:
            raise Unauthenticated("revoked")
        return ALPHA_TRAINER

    cached = CachedResolver(resolve, ttl_s=30, clock=clock)
    assert await cached("k", "m") is ALPHA_TRAINER
    revoked.add("k")
    clock.now += 29
    assert await cached("k", "m") is ALPHA_TRAINER  # within the TTL: the cached answer
    clock.now += 2
    with pytest.raises(Unauthenticated, match="revoked"):  # past it: the revocation shows
        await cached("k", "m")
    with pytest.raises(Unauthenticated):  # refusals are cached too, briefly
        await cached("k", "m")
    assert calls == ["k", "k"]
    revoked.clear()
    clock.now += CachedResolver.NEGATIVE_TTL_S + 0.1
    assert await cached("k", "m") is ALPHA_TRAINER
    assert len(calls) == 3


async def test_cache_is_bounded() -> None:
    async def resolve(key: str, method: str) -> AuthPrincipal:
        return AuthPrincipal(key_id=key)

    cached = CachedResolver(resolve, ttl_s=30, max_entries=2)
    for key in ("k1", "k2", "k3"):
        await cached(key, "m")
    assert len(cached._entries) == 2


def test_principal_survives_the_wire() -> None:
    p = AuthPrincipal(
        key_id="c" * 16,
        name="alice",
        roles={"alpha": Role.admin, "beta": Role.viewer},
        platform_admin=False,
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
    )
    back = auth.principal_from_proto(auth.principal_to_proto(p))
    assert (back.key_id, back.name, dict(back.roles), back.platform_admin, back.expires_at) == (
        p.key_id,
        p.name,
        dict(p.roles),
        p.platform_admin,
        p.expires_at,
    )
    assert auth.principal_from_proto(auth.principal_to_proto(DEVELOPMENT)).expires_at is None


class _Settings(ServiceSettings, AuthSettings):
    pass


def test_auth_is_on_unless_development_mode_or_explicitly_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FTOPS_AUTH_MODE", raising=False)
    monkeypatch.delenv("FTOPS_DEV_MODE", raising=False)
    assert auth.effective_mode(_Settings()) is AuthMode.enabled
    assert auth.effective_mode(_Settings(dev_mode=True)) is AuthMode.disabled
    assert auth.effective_mode(_Settings(dev_mode=True, auth_mode="enabled")) is AuthMode.enabled
    monkeypatch.setenv("FTOPS_AUTH_MODE", "disabled")
    assert auth.effective_mode(_Settings()) is AuthMode.disabled
    assert auth.effective_mode(ServiceSettings()) is AuthMode.enabled  # no auth fields at all


async def test_forget_drops_a_revoked_key_at_once() -> None:
    clock = _Clock()
    revoked: set[str] = set()
    key = auth.new_api_key()[1]
    parsed = auth.parse_api_key(key)
    assert parsed is not None

    async def resolve(presented: str, method: str) -> AuthPrincipal:
        if presented in revoked:
            raise Unauthenticated("revoked")
        return AuthPrincipal(key_id=parsed.key_id, roles={"alpha": Role.releaser})

    cached = CachedResolver(resolve, ttl_s=30, clock=clock)
    assert (await cached(key, "m")).key_id == parsed.key_id
    revoked.add(key)
    assert cached.forget("f" * 16) == 0  # another key: nothing dropped
    assert (await cached(key, "m")).key_id == parsed.key_id
    assert cached.forget(parsed.key_id) == 1
    with pytest.raises(Unauthenticated, match="revoked"):  # long before the TTL
        await cached(key, "m")


async def test_an_answer_asked_before_a_revocation_is_not_cached() -> None:
    import asyncio

    release = asyncio.Event()
    calls = 0

    async def slow(presented: str, method: str) -> AuthPrincipal:
        nonlocal calls
        calls += 1
        await release.wait()
        return ALPHA_TRAINER

    cached = CachedResolver(slow, ttl_s=30)
    in_flight = asyncio.create_task(cached("k", "m"))
    await asyncio.sleep(0)
    cached.forget(ALPHA_TRAINER.key_id)  # the revocation lands while the answer travels
    release.set()
    assert await in_flight is ALPHA_TRAINER
    await cached("k", "m")
    assert calls == 2  # the stale answer was not kept


def test_require_tells_the_audit_which_team_was_refused() -> None:
    token = current_principal.set(ALPHA_TRAINER)
    try:
        with pytest.raises(PermissionDenied) as info:
            auth.require("beta", Role.viewer, action="GetRoute")
    finally:
        current_principal.reset(token)
    assert info.value._ftops_team == "beta"  # type: ignore[attr-defined]


class _ServiceKeySettings(ServiceSettings, AuthSettings):
    registry_api_key: str = ""


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FTOPS_AUTH_MODE": "disabled", "FTOPS_REGISTRY_API_KEY": "k"}, "FTOPS_AUTH_MODE"),
        ({"FTOPS_AUTH_MODE": "enabled"}, "FTOPS_REGISTRY_API_KEY"),
        ({}, "FTOPS_REGISTRY_API_KEY"),  # on by default outside development mode
    ],
)
def test_unsafe_auth_settings_stop_the_service_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    from ftops_runtime.app import run_service

    for name in ("FTOPS_AUTH_MODE", "FTOPS_DEV_MODE", "FTOPS_REGISTRY_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    served: list[object] = []

    async def serve(settings: _ServiceKeySettings, stop: object) -> None:
        served.append(settings)

    with pytest.raises(SystemExit) as info:
        run_service("svc", _ServiceKeySettings, serve)
    assert named in str(info.value)
    assert not served


@pytest.mark.parametrize(
    "settings",
    [
        _ServiceKeySettings(dev_mode=True),  # development: off by default, no key needed
        _ServiceKeySettings(dev_mode=True, auth_mode="disabled"),
        _ServiceKeySettings(auth_mode="enabled", registry_api_key="ftk_x"),
        _Settings(auth_mode="enabled"),  # the registry: no service key of its own
    ],
)
def test_sound_auth_settings_start(settings: ServiceSettings) -> None:
    assert auth.startup_problems(settings) == []
