"""Teams and API keys: creation (the secret is returned once, only its hash stored),
listing, revocation, and resolving a presented key to its principal.

Authorization (who may create which key) is the servicer's job; this module enforces what
holds whoever asks: known teams, one role per team, expiry in the future.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftops.registry.v1 import registry_pb2
from ftops_registry import audit, convert
from ftops_registry.db import Database
from ftops_registry.models import ApiKeyRoleRow, ApiKeyRow, TeamRow, utcnow
from ftops_registry.registry import check_name
from ftops_runtime.auth import (
    AuthPrincipal,
    Role,
    hash_secret,
    new_api_key,
    parse_api_key,
    role_to_proto,
    secret_matches,
)
from ftops_runtime.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated

log = logging.getLogger(__name__)

MAX_KEY_NAME = 200
MAX_DESCRIPTION = 2000
BOOTSTRAP = "bootstrap"


def check_key_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_KEY_NAME or not name.isprintable():
        raise InvalidArgument(
            f"API key name must be 1-{MAX_KEY_NAME} printable characters (who holds it, "
            "e.g. 'alice' or 'trainer-service')"
        )
    return name


class Keys:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- teams -----------------------------------------------------------------------

    def create_team(self, name: str, description: str) -> registry_pb2.Team:
        check_name("team", name)
        if len(description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"team description is over {MAX_DESCRIPTION} characters")

        def work(s: Session) -> registry_pb2.Team:
            if s.get(TeamRow, name) is not None:
                raise AlreadyExists(f"team {name!r} already exists")
            row = TeamRow(name=name, description=description, created_at=utcnow())
            s.add(row)
            s.flush()  # a concurrent creator fails here; Database.write retries and sees it
            audit.record(s, "CreateTeam", f"team:{name}", team=name)
            return _team(row)

        return self.db.write(work)

    def list_teams(self, only: Collection[str] | None = None) -> registry_pb2.ListTeamsResponse:
        """Every team, or only those named in ``only``."""
        query = select(TeamRow).order_by(TeamRow.name)
        if only is not None:
            query = query.where(TeamRow.name.in_(list(only)))
        with self.db.read() as s:
            return registry_pb2.ListTeamsResponse(teams=[_team(r) for r in s.scalars(query)])

    # -- keys ------------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        roles: Sequence[tuple[str, Role]],
        *,
        platform_admin: bool = False,
        expires_at: datetime | None = None,
        created_by: str = "",
    ) -> registry_pb2.CreateApiKeyResponse:
        name = check_key_name(name)
        teams = [team for team, _ in roles]
        if len(set(teams)) != len(teams):
            raise InvalidArgument("an API key has one role per team; a team is listed twice")
        if not roles and not platform_admin:
            raise InvalidArgument(
                "an API key needs a role in at least one team (or platform_admin)"
            )
        if expires_at is not None and expires_at <= utcnow():
            raise InvalidArgument(f"expires_at {expires_at.isoformat()} is not in the future")
        key_id, secret = new_api_key()
        parsed = parse_api_key(secret)
        assert parsed is not None

        def work(s: Session) -> registry_pb2.CreateApiKeyResponse:
            missing = sorted(
                set(teams) - set(s.scalars(select(TeamRow.name).where(TeamRow.name.in_(teams))))
            )
            if missing:
                raise NotFound(f"team(s) {', '.join(missing)} do not exist (CreateTeam first)")
            row = ApiKeyRow(
                key_id=key_id,
                name=name,
                secret_hash=hash_secret(parsed.secret),
                platform_admin=platform_admin,
                created_at=utcnow(),
                created_by=created_by or audit.caller(),
                expires_at=expires_at,
                revoked_at=None,
            )
            s.add(row)
            s.flush()  # the roles reference it (no ORM relationship orders the inserts)
            s.add_all(ApiKeyRoleRow(key_id=key_id, team=t, role=r.value) for t, r in roles)
            s.flush()
            detail = _describe(roles, platform_admin, expires_at) + f" ({name})"
            for team in teams or [""]:
                audit.record(s, "CreateApiKey", f"key:{key_id}", team=team, detail=detail)
            return registry_pb2.CreateApiKeyResponse(
                key=_key(row, _roles(s, key_id)), secret=secret
            )

        created = self.db.write(work)
        log.info("created API key %s (%s)", key_id, created.key.name)
        return created

    def get_key(self, key_id: str) -> registry_pb2.ApiKey:
        with self.db.read() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFound(f"API key {key_id!r} does not exist")
            return _key(row, _roles(s, key_id))

    def list_keys(
        self, teams: Collection[str] | None = None, include_revoked: bool = False
    ) -> registry_pb2.ListApiKeysResponse:
        """Keys with a role in one of ``teams`` (None: all keys), oldest first."""
        query = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.key_id)
        if teams is not None:
            holders = select(ApiKeyRoleRow.key_id).where(ApiKeyRoleRow.team.in_(list(teams)))
            query = query.where(ApiKeyRow.key_id.in_(holders))
        if not include_revoked:
            query = query.where(ApiKeyRow.revoked_at.is_(None))
        with self.db.read() as s:
            rows = s.scalars(query).all()
            return registry_pb2.ListApiKeysResponse(
                keys=[_key(r, _roles(s, r.key_id)) for r in rows]
            )

    def revoke_key(self, key_id: str) -> registry_pb2.ApiKey:
        """Idempotent: revoking a revoked key keeps the first revocation time."""

        def work(s: Session) -> registry_pb2.ApiKey:
            row = s.get(ApiKeyRow, key_id, with_for_update=True)
            if row is None:
                raise NotFound(f"API key {key_id!r} does not exist")
            roles = _roles(s, key_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                log.info("revoked API key %s (%s)", key_id, row.name)
            for team in [r.team for r in roles] or [""]:
                audit.record(s, "RevokeApiKey", f"key:{key_id}", team=team, detail=row.name)
            return _key(row, roles)

        return self.db.write(work)

    # -- authentication --------------------------------------------------------------

    def resolve(self, key: str) -> AuthPrincipal:
        """The principal for a presented key; Unauthenticated for anything else. Says
        "revoked" or "expired" only to a caller that proved it holds the secret."""
        parsed = parse_api_key(key)
        if parsed is None:
            raise Unauthenticated("not an ftops API key (expected 'ftk_<key id>_<secret>')")
        with self.db.read() as s:
            row = s.get(ApiKeyRow, parsed.key_id)
            if row is None or not secret_matches(parsed.secret, row.secret_hash):
                raise Unauthenticated(f"unknown API key {parsed.key_id}")
            if row.revoked_at is not None:
                raise Unauthenticated(f"API key {row.key_id} was revoked at {row.revoked_at}")
            if row.expires_at is not None and convert.as_utc(row.expires_at) <= utcnow():
                raise Unauthenticated(f"API key {row.key_id} expired at {row.expires_at}")
            return AuthPrincipal(
                key_id=row.key_id,
                name=row.name,
                roles={r.team: Role(r.role) for r in _roles(s, row.key_id)},
                platform_admin=row.platform_admin,
                expires_at=convert.as_utc(row.expires_at) if row.expires_at else None,
            )

    def bootstrap_admin(self, key: str = "", name: str = "bootstrap-admin") -> tuple[str, bool]:
        """Make sure a platform-admin key exists: ``key`` (from the settings) or a new
        one. Returns (the key, whether it was created now)."""
        if not key:
            created = self.create_key(name, [], platform_admin=True, created_by=BOOTSTRAP)
            return created.secret, True
        parsed = parse_api_key(key)
        if parsed is None:
            raise InvalidArgument(
                "the bootstrap admin key must look like 'ftk_<16 hex>_<43 url-safe chars>' "
                "(generate one with `ftops-registry bootstrap-admin --print-only`)"
            )

        def work(s: Session) -> bool:
            row = s.get(ApiKeyRow, parsed.key_id, with_for_update=True)
            if row is not None:
                if not secret_matches(parsed.secret, row.secret_hash):
                    raise AlreadyExists(
                        f"API key {parsed.key_id} exists with a different secret; "
                        "choose another bootstrap key"
                    )
                return False
            s.add(
                ApiKeyRow(
                    key_id=parsed.key_id,
                    name=name,
                    secret_hash=hash_secret(parsed.secret),
                    platform_admin=True,
                    created_at=utcnow(),
                    created_by=BOOTSTRAP,
                )
            )
            audit.record(s, "BootstrapAdmin", f"key:{parsed.key_id}", detail=name, actor=BOOTSTRAP)
            return True

        return key, self.db.write(work)


def _roles(s: Session, key_id: str) -> list[ApiKeyRoleRow]:
    return list(
        s.scalars(
            select(ApiKeyRoleRow).where(ApiKeyRoleRow.key_id == key_id).order_by(ApiKeyRoleRow.team)
        )
    )


def _describe(
    roles: Sequence[tuple[str, Role]], platform_admin: bool, expires: datetime | None
) -> str:
    parts = [f"{t}={r.value}" for t, r in roles]
    if platform_admin:
        parts.append("platform_admin")
    if expires is not None:
        parts.append(f"expires {expires.isoformat()}")
    return " ".join(parts)


def _team(row: TeamRow) -> registry_pb2.Team:
    return registry_pb2.Team(
        name=row.name, description=row.description, created_at=convert.timestamp(row.created_at)
    )


def _key(row: ApiKeyRow, roles: Sequence[ApiKeyRoleRow]) -> registry_pb2.ApiKey:
    msg = registry_pb2.ApiKey(
        key_id=row.key_id,
        name=row.name,
        roles=[registry_pb2.TeamRole(team=r.team, role=role_to_proto(Role(r.role))) for r in roles],
        platform_admin=row.platform_admin,
        created_at=convert.timestamp(row.created_at),
        created_by=row.created_by,
    )
    if row.expires_at is not None:
        msg.expires_at.CopyFrom(convert.timestamp(row.expires_at))
    if row.revoked_at is not None:
        msg.revoked_at.CopyFrom(convert.timestamp(row.revoked_at))
    return msg
