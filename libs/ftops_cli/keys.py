"""``ftops keys create|list|revoke`` and ``ftops teams create|list`` (docs/security.md)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from ftops.registry.v1 import registry_pb2
from ftops_cli.errors import CliError
from ftops_cli.output import Output, OutputOption, or_dash, print_json, print_table, when
from ftops_cli.runner import run
from ftops_client import FtopsClient

keys_app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)
teams_app = typer.Typer(help="Teams (creating one needs a platform admin).", no_args_is_help=True)

ROLES = {
    "viewer": registry_pb2.ROLE_VIEWER,
    "trainer": registry_pb2.ROLE_TRAINER,
    "releaser": registry_pb2.ROLE_RELEASER,
    "admin": registry_pb2.ROLE_ADMIN,
}
_DURATION = re.compile(r"^(\d+)([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def parse_role(text: str) -> tuple[str, registry_pb2.Role.ValueType]:
    """``"support=trainer"`` → ("support", ROLE_TRAINER)."""
    team, sep, role = text.partition("=")
    if not sep or not team.strip() or role.strip() not in ROLES:
        raise CliError(
            f"--role must be TEAM=ROLE with ROLE one of {', '.join(ROLES)}, got {text!r}"
        )
    return team.strip(), ROLES[role.strip()]


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """``"30d"``, ``"12h"``, ``"45m"`` from now, or an ISO 8601 time (UTC if no zone)."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(text.strip())
    if match:
        return now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when_ = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"--expires must be a duration (30d, 12h, 45m) or an ISO time, got {text!r}"
        ) from None
    return when_ if when_.tzinfo is not None else when_.replace(tzinfo=UTC)


def _roles(key: registry_pb2.ApiKey) -> str:
    parts = [
        f"{r.team}={registry_pb2.Role.Name(r.role).removeprefix('ROLE_').lower()}"
        for r in key.roles
    ]
    if key.platform_admin:
        parts.append("platform-admin")
    return ", ".join(parts) or "-"


def _status(key: registry_pb2.ApiKey) -> str:
    if key.HasField("revoked_at"):
        return f"revoked {when(key.revoked_at)}"
    if key.HasField("expires_at"):
        return f"expires {when(key.expires_at)}"
    return "active"


def _print_keys(title: str, keys: list[registry_pb2.ApiKey]) -> None:
    print_table(
        title,
        ("key id", "name", "roles", "status", "created", "by"),
        (
            (k.key_id, k.name, _roles(k), _status(k), when(k.created_at), or_dash(k.created_by))
            for k in keys
        ),
    )


@keys_app.command("create")
def create_key(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="who holds the key, e.g. alice or ci-trainer")],
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help="TEAM=ROLE (viewer|trainer|releaser|admin); repeatable"),
    ] = None,
    platform_admin: Annotated[
        bool, typer.Option("--platform-admin", help="every team (platform admins only)")
    ] = False,
    expires: Annotated[
        str | None, typer.Option(help="30d, 12h, 45m or an ISO time; default: never")
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """Create an API key. The key is printed this once: the registry keeps only a hash."""

    async def work(client: FtopsClient) -> None:
        # Parsed in here so a mistake is reported like every other error (one line).
        roles = [parse_role(r) for r in role or []]
        if not roles and not platform_admin:
            raise CliError("give at least one --role TEAM=ROLE (or --platform-admin)")
        expires_at = parse_expiry(expires) if expires else None
        created = await client.create_api_key(
            name, roles, platform_admin=platform_admin, expires_at=expires_at
        )
        if output is Output.json:
            print_json(created)
            return
        _print_keys("created API key", [created.key])
        typer.echo(created.secret)
        typer.echo("Store this key now: it is not shown again.", err=True)

    run(ctx, work)


@keys_app.command("list")
def list_keys(
    ctx: typer.Context,
    team: Annotated[str, typer.Option(help="only keys with a role in this team")] = "",
    include_revoked: Annotated[bool, typer.Option("--include-revoked")] = False,
    output: OutputOption = Output.table,
) -> None:
    """API keys you administer (never their secrets)."""

    async def work(client: FtopsClient) -> None:
        resp = await client.list_api_keys(team, include_revoked=include_revoked)
        if output is Output.json:
            print_json(resp)
            return
        _print_keys(f"API keys{f' of {team}' if team else ''}", list(resp.keys))

    run(ctx, work)


@keys_app.command("revoke")
def revoke_key(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="the key id (the part after 'ftk_')")],
    output: OutputOption = Output.table,
) -> None:
    """Revoke a key: it stops working at once in the registry, and in the other services
    within their auth cache TTL."""

    async def work(client: FtopsClient) -> None:
        key = await client.revoke_api_key(key_id)
        if output is Output.json:
            print_json(key)
            return
        _print_keys("revoked API key", [key])

    run(ctx, work)


@teams_app.command("create")
def create_team(
    ctx: typer.Context,
    name: str,
    description: Annotated[str, typer.Option(help="what the team owns")] = "",
    output: OutputOption = Output.table,
) -> None:
    """Create a team (platform admins only)."""

    async def work(client: FtopsClient) -> None:
        team = await client.create_team(name, description)
        if output is Output.json:
            print_json(team)
            return
        print_table("created team", ("team", "description", "created"), [_team_row(team)])

    run(ctx, work)


@teams_app.command("list")
def list_teams(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """Teams you have a role in (all of them for a platform admin)."""

    async def work(client: FtopsClient) -> None:
        resp = await client.list_teams()
        if output is Output.json:
            print_json(resp)
            return
        print_table("teams", ("team", "description", "created"), map(_team_row, resp.teams))

    run(ctx, work)


def _team_row(team: registry_pb2.Team) -> tuple[str, str, str]:
    return team.name, or_dash(team.description), when(team.created_at)
