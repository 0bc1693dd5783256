"""API keys, principals and authorization checks shared by every service.

A key looks like ``ftk_<key id>_<secret>``: the key id is public (audit logs, listings,
revocation), the secret is 256 random bits that the registry stores only as a SHA-256
hash (a fast hash is enough: the secret is random, not a password). A caller sends the
key as ``authorization: Bearer <key>`` or ``x-ftops-key: <key>``.

Each service installs an authenticator on its ``GrpcServer`` (the runtime's auth
interceptor puts the resolved principal in ``current_principal``); the registry resolves
keys from its own database, every other service asks the registry's ``Authenticate`` and
caches the answer for ``auth_cache_ttl_s``. A revocation takes effect at once: the
registry publishes ``auth.key_changed`` and every service forgets the key
(``ServiceAuth``; the TTL is only a fallback); an expiry is checked on every call.
Handlers then call ``require(team, role)``. Docs: docs/security.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

import grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_runtime import denials
from ftops_runtime.denials import key_from_metadata
from ftops_runtime.errors import NotFound, PermissionDenied, Unauthenticated, Unavailable
from ftops_runtime.events import AUTH_KEY_CHANGED
from ftops_runtime.interceptors import Authenticator, Principal, current_principal
from ftops_runtime.tls import ClientTls
from ftops_runtime.tls import load as load_tls

if TYPE_CHECKING:
    from ftops_runtime.bus import EventBus

log = logging.getLogger(__name__)

KEY_PREFIX = "ftk"
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_KEY_RE = re.compile(r"^ftk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
METADATA_KEY = "x-ftops-key"
MISSING_KEY = (
    "missing API key: send 'authorization: Bearer <key>' or 'x-ftops-key: <key>' "
    "(the CLI reads FTOPS_API_KEY)"
)


class Role(StrEnum):
    viewer = "viewer"
    trainer = "trainer"
    releaser = "releaser"
    admin = "admin"


class _Grant(StrEnum):
    read = "read"
    train = "train"
    release = "release"
    manage = "manage"


# Not a ladder: a trainer cannot release and a releaser cannot train (separation of
# duties); admin holds every grant of its team.
_GRANTS: dict[Role, frozenset[_Grant]] = {
    Role.viewer: frozenset({_Grant.read}),
    Role.trainer: frozenset({_Grant.read, _Grant.train}),
    Role.releaser: frozenset({_Grant.read, _Grant.release}),
    Role.admin: frozenset(_Grant),
}


def grants(held: Role, needed: Role) -> bool:
    """Whether a key holding ``held`` in a team may do what ``needed`` is for."""
    return _GRANTS[needed] <= _GRANTS[held]


class AuthMode(StrEnum):
    enabled = "enabled"
    disabled = "disabled"


@dataclass(frozen=True, eq=False)
class AuthPrincipal(Principal):
    """An authenticated key: its role per team, the platform-admin flag, its expiry."""

    name: str = ""
    roles: Mapping[str, Role] = field(default_factory=dict)
    platform_admin: bool = False
    expires_at: datetime | None = None

    def can(self, team: str, role: Role) -> bool:
        if self.platform_admin:
            return True
        held = self.roles.get(team) if team else None
        return held is not None and grants(held, role)

    def teams(self, role: Role = Role.viewer) -> frozenset[str]:
        """The teams in which this key may act as ``role`` (platform admin: see ``can``)."""
        return frozenset(t for t, held in self.roles.items() if grants(held, role))

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC))


# Authentication off (development mode): the caller may do everything.
DEVELOPMENT = AuthPrincipal(key_id="anonymous", anonymous=True, platform_admin=True)
# A public method's caller when no key was sent: no roles at all.
NOBODY = AuthPrincipal(key_id="anonymous", anonymous=True)


# -- keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    secret: str


def new_api_key() -> tuple[str, str]:
    """A fresh ``(key_id, full key)``."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def parse_api_key(key: str) -> ParsedKey | None:
    """The key's parts, or None when it is not an ftops key at all."""
    match = _KEY_RE.match(key.strip())
    return ParsedKey(match.group(1), match.group(2)) if match else None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


__all__ = ["key_from_metadata"]  # re-exported: where callers have always found it


# -- settings ---------------------------------------------------------------------------


class AuthSettings(BaseSettings):
    """Mixed into a service's settings (``class Settings(ServiceSettings, AuthSettings)``)."""

    model_config = SettingsConfigDict(env_prefix="FTOPS_", extra="ignore")

    auth_mode: AuthMode | None = Field(
        None,
        description="enabled: every call needs an API key; disabled: no checks (development "
        "only). Unset: disabled in dev_mode, enabled otherwise.",
    )
    auth_cache_ttl_s: float = Field(
        30.0,
        ge=0,
        description="How long a service trusts the registry's answer for a key. A revocation "
        "reaches every service at once (auth.key_changed); this is the fallback.",
    )


def effective_mode(settings: Any) -> AuthMode:
    """The explicit ``auth_mode``, else disabled in development mode, else enabled."""
    mode = getattr(settings, "auth_mode", None)
    if mode is not None:
        return AuthMode(mode)
    return AuthMode.disabled if getattr(settings, "dev_mode", False) else AuthMode.enabled


def startup_problems(settings: Any) -> list[str]:
    """What makes these auth settings unfit to start a service with (each naming its
    setting): checked by the process entry point, so a mistake stops the service at once
    instead of leaving it open, or failing at its first call."""
    problems = []
    dev = bool(getattr(settings, "dev_mode", False))
    mode = effective_mode(settings)
    if mode is AuthMode.disabled and not dev:
        problems.append(
            "FTOPS_AUTH_MODE=disabled turns access control off (every caller a platform "
            "admin) and is accepted only in development mode (FTOPS_DEV_MODE=true)"
        )
    if mode is AuthMode.enabled and not str(getattr(settings, "registry_api_key", "x")).strip():
        problems.append(
            "FTOPS_REGISTRY_API_KEY is empty while access control is on: the registry "
            "would refuse every call this service makes; set it to this service's own key"
        )
    return problems


# -- authenticators ---------------------------------------------------------------------

# (key, method) -> the principal; raises Unauthenticated for an unknown, revoked or
# expired key, Unavailable when it cannot tell.
Resolver = Callable[[str, str], Awaitable[AuthPrincipal]]


def authenticator(
    resolve: Resolver, *, mode: AuthMode = AuthMode.enabled, public: Collection[str] = ()
) -> Authenticator:
    """The hook for ``GrpcServer(authenticate=...)``. ``public`` are full method names
    callable without a key (their caller is ``NOBODY`` unless it sends one)."""

    async def authenticate(md: Mapping[str, str], method: str) -> Principal:
        if mode is AuthMode.disabled:
            return DEVELOPMENT
        key = key_from_metadata(md)
        if not key:
            if method in public:
                return NOBODY
            raise Unauthenticated(MISSING_KEY)
        principal = await resolve(key, method)
        if principal.expired():
            raise Unauthenticated(f"API key {principal.key_id} expired at {principal.expires_at}")
        return principal

    return authenticate


class CachedResolver:
    """Remembers answers for ``ttl_s`` (refusals for at most 5 s, so a key created a
    moment ago works quickly), keyed by the key's hash, never the key itself.
    ``forget(key_id)`` drops what it knows of a key at once (a revocation)."""

    NEGATIVE_TTL_S = 5.0

    def __init__(
        self,
        resolve: Resolver,
        *,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolve = resolve
        self._clock = clock
        self._ttl = ttl_s
        self._negative_ttl = min(ttl_s, self.NEGATIVE_TTL_S)
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, AuthPrincipal | Unauthenticated]] = (
            OrderedDict()
        )
        # Bumped by forget(): an answer asked before a revocation and arriving after it
        # must not be cached (it may be the key's last "valid").
        self._generation = 0

    async def __call__(self, key: str, method: str) -> AuthPrincipal:
        digest = hash_secret(key)
        hit = self._entries.get(digest)
        now = self._clock()
        if hit is not None and hit[0] > now:
            self._entries.move_to_end(digest)
            if isinstance(hit[1], Unauthenticated):
                raise Unauthenticated(str(hit[1]))
            return hit[1]
        generation = self._generation
        try:
            principal = await self._resolve(key, method)
        except Unauthenticated as exc:
            self._store(digest, now + self._negative_ttl, exc, generation)
            raise
        self._store(digest, now + self._ttl, principal, generation)
        return principal

    def forget(self, key_id: str) -> int:
        """Drop every cached answer for ``key_id``; returns how many there were."""
        self._generation += 1
        stale = [d for d, (_, value) in self._entries.items() if _key_id(value) == key_id]
        for digest in stale:
            del self._entries[digest]
        return len(stale)

    def _store(
        self,
        digest: str,
        until: float,
        value: AuthPrincipal | Unauthenticated,
        generation: int,
    ) -> None:
        if generation != self._generation:
            return  # a key changed while this answer was on its way: ask again next time
        self._entries[digest] = (until, value)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


def _key_id(value: AuthPrincipal | Unauthenticated) -> str:
    return value.key_id if isinstance(value, AuthPrincipal) else ""


class RegistryResolver:
    """Asks the registry's ``Authenticate``. The channel is opened on first use (inside
    the server's event loop); ``close()`` on shutdown."""

    def __init__(
        self, registry_address: str, *, timeout_s: float = 5.0, tls: ClientTls | None = None
    ) -> None:
        self._address = registry_address
        self._tls = tls
        self._timeout = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._lock = asyncio.Lock()

    async def _stub(self) -> registry_pb2_grpc.RegistryServiceAsyncStub:
        async with self._lock:
            if self._channel is None:
                from ftops_runtime.client import channel  # client imports server: no cycle

                self._channel = channel(self._address, tls=self._tls)
        return cast(
            "registry_pb2_grpc.RegistryServiceAsyncStub",
            registry_pb2_grpc.RegistryServiceStub(self._channel),
        )

    async def __call__(self, key: str, method: str) -> AuthPrincipal:
        stub = await self._stub()
        try:
            reply = await stub.Authenticate(
                registry_pb2.AuthenticateRequest(api_key=key), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(exc.details() or "unknown API key") from exc
            raise Unavailable(
                f"cannot verify the API key: the registry at {self._address} answered "
                f"{exc.code().name}: {exc.details()}"
            ) from exc
        return principal_from_proto(reply)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class ServiceAuth:
    """A non-registry service's side of access control: keys checked by the registry and
    cached (``cache``), forgotten the moment the registry announces a revocation on
    ``auth.key_changed``, and the service's refusals (``denials``, given to its
    ``GrpcServer``) published as ``audit.denied`` for the registry's audit log.

    Every replica follows ``auth.key_changed`` with a durable of its own (fan-out) that
    starts at new events and is removed once the replica is gone."""

    def __init__(
        self, settings: Any, registry_address: str, *, bus: EventBus | None, service: str
    ) -> None:
        instance = str(getattr(settings, "instance_id", "") or service)
        self.remote = RegistryResolver(registry_address, tls=load_tls(settings).client)
        ttl = float(getattr(settings, "auth_cache_ttl_s", 30.0))
        self.cache = CachedResolver(self.remote, ttl_s=ttl)
        self.authenticate = authenticator(self.cache, mode=effective_mode(settings))
        self.denials = denials.DenialRecorder(service)
        if bus is not None:
            from nats.js.api import DeliverPolicy  # the runtime's only nats user besides bus

            self.denials.bind(denials.bus_flush(bus, service=service, instance=instance))
            bus.subscribe(
                AUTH_KEY_CHANGED,
                f"{service}-keys-{instance}",
                self.on_key_changed,
                deliver_policy=DeliverPolicy.NEW,
                inactive_threshold_s=300.0,
                ack_wait_s=5.0,
            )

    async def on_key_changed(self, event: events_pb2.ApiKeyChanged, delivery: Any) -> None:
        dropped = self.cache.forget(event.key_id)
        log.info(
            "API key %s changed (revoked=%s): %d cached answers dropped",
            event.key_id,
            event.revoked,
            dropped,
        )

    async def close(self) -> None:
        await self.remote.close()


def registry_authenticator(
    settings: Any, registry_address: str, *, bus: EventBus | None = None, service: str = ""
) -> tuple[Authenticator, ServiceAuth]:
    """What a service other than the registry installs: keys checked by the registry,
    cached for ``settings.auth_cache_ttl_s``; with ``bus``, revocations applied at once
    and refusals audited (give ``ServiceAuth.denials`` to the ``GrpcServer``). Close the
    ``ServiceAuth`` on shutdown."""
    guard = ServiceAuth(settings, registry_address, bus=bus, service=service or "service")
    return guard.authenticate, guard


# -- protobuf ---------------------------------------------------------------------------


def role_from_proto(value: int) -> Role:
    name = registry_pb2.Role.Name(value)  # type: ignore[arg-type]
    return Role(name.removeprefix("ROLE_").lower())


def role_to_proto(role: Role) -> registry_pb2.Role.ValueType:
    return registry_pb2.Role.Value(f"ROLE_{role.value.upper()}")


def principal_from_proto(msg: registry_pb2.Principal) -> AuthPrincipal:
    return AuthPrincipal(
        key_id=msg.key_id,
        name=msg.name,
        roles={r.team: role_from_proto(r.role) for r in msg.roles},
        platform_admin=msg.platform_admin,
        expires_at=msg.expires_at.ToDatetime(tzinfo=UTC) if msg.HasField("expires_at") else None,
    )


def principal_to_proto(p: AuthPrincipal) -> registry_pb2.Principal:
    msg = registry_pb2.Principal(
        key_id=p.key_id,
        name=p.name,
        roles=[
            registry_pb2.TeamRole(team=t, role=role_to_proto(r)) for t, r in sorted(p.roles.items())
        ],
        platform_admin=p.platform_admin,
    )
    if p.expires_at is not None:
        msg.expires_at.FromDatetime(p.expires_at)
    return msg


# -- authorization ----------------------------------------------------------------------


def current() -> AuthPrincipal:
    """The caller. A plain ``Principal`` (a service still on the static-key hook, or code
    running outside a call) has no roles."""
    p = current_principal.get()
    if isinstance(p, AuthPrincipal):
        return p
    return AuthPrincipal(key_id=p.key_id, anonymous=p.anonymous)


def _who(p: AuthPrincipal) -> str:
    return "an anonymous caller" if p.anonymous else f"API key {p.key_id}"


def require(team: str, role: Role, *, action: str = "this") -> AuthPrincipal:
    """The caller, if it may act as ``role`` in ``team``; else PERMISSION_DENIED."""
    p = current()
    if p.can(team, role):
        return p
    if not team:
        message = (
            f"{action} concerns a resource that belongs to no team: only a platform admin "
            f"may do it, and {_who(p)} is not one"
        )
    else:
        held = p.roles.get(team)
        has = f"has the {held} role there" if held else "has no role in that team"
        message = f"{action} needs the {role} (or admin) role in team {team!r}; {_who(p)} {has}"
    # Every service's trail of denied calls (the registry also writes its audit log).
    log.warning("refused %s for key %s: %s", action, p.key_id, message)
    refusal = PermissionDenied(message)
    denials.tag(refusal, team=team)
    raise refusal


def require_any_team(role: Role, *, action: str = "this") -> AuthPrincipal:
    """The caller, if it may act as ``role`` in at least one team."""
    p = current()
    if p.platform_admin or p.teams(role):
        return p
    raise PermissionDenied(f"{action} needs the {role} (or admin) role in some team")


def require_platform_admin(*, action: str = "this") -> AuthPrincipal:
    p = current()
    if p.platform_admin:
        return p
    raise PermissionDenied(f"{action} needs a platform-admin key; {_who(p)} is not one")


class VersionTeams:
    """Version reference ("ver_..." or "adapter:number") -> the team that owns it, asked of
    the registry with the service's own key. Cached for the process: a version never
    changes team."""

    def __init__(self, stub: registry_pb2_grpc.RegistryServiceStub, *, timeout_s: float) -> None:
        self._stub = stub
        self._timeout_s = timeout_s
        self._teams: dict[str, str] = {}

    async def team(self, ref: str) -> str:
        cached = self._teams.get(ref)
        if cached is not None:
            return cached
        request = (
            registry_pb2.GetVersionRequest(name=ref)
            if ":" in ref
            else registry_pb2.GetVersionRequest(version_id=ref)
        )
        try:
            version = await self._stub.GetVersion(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise NotFound(f"version {ref!r} not found") from exc
            raise Unavailable(
                f"cannot tell which team version {ref!r} belongs to: the registry "
                f"answered {exc.code().name}: {exc.details()}"
            ) from exc
        team = str(version.team)
        self._teams[ref] = self._teams[version.version_id] = team
        return team
