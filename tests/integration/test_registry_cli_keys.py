"""``ftops teams`` and ``ftops keys`` through the CLI against a real registry with auth on:
the key printed once works, listings never show secrets, a revoked key is refused, bad
input is one line with the usage exit code."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from ftops.registry.v1 import registry_pb2
from ftops_cli.app import app
from ftops_cli.errors import CliError
from ftops_cli.keys import parse_expiry, parse_role
from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime import auth

pytestmark = pytest.mark.integration


@pytest.fixture
async def registry(tmp_path: Path, nats_url: str) -> AsyncIterator[tuple[RegistryApp, str]]:
    admin_key = auth.new_api_key()[1]
    registry_app = RegistryApp(
        RegistrySettings(
            grpc_port=0,
            nats_url=nats_url,
            database_url=f"sqlite:///{tmp_path}/registry.db",
            artifact_dir=tmp_path / "artifacts",
            health_interval_s=0.1,
            shutdown_grace_s=1,
            instance_id=f"cli-{uuid.uuid4().hex[:6]}",
            auth_mode="enabled",
            bootstrap_admin_key=admin_key,
        ),
        durable=f"registry-cli-{uuid.uuid4().hex[:8]}",
    )
    await registry_app.start()
    await registry_app.wait_ready()
    yield registry_app, admin_key
    await registry_app.stop()


async def _cli(address: str, key: str, *argv: str) -> Result:
    # The CLI runs its own event loop: keep it off this one, which serves the registry.
    return await asyncio.to_thread(
        CliRunner().invoke, app, [f"--registry={address}", f"--api-key={key}", *argv]
    )


async def _json(address: str, key: str, *argv: str) -> Any:
    result = await _cli(address, key, *argv, "--output", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_teams_and_keys_round_trip(registry: tuple[RegistryApp, str]) -> None:
    reg, admin = registry
    address = reg.address
    team = await _json(address, admin, "teams", "create", "alpha", "--description", "support")
    assert team["name"] == "alpha"

    created = await _json(
        address, admin, "keys", "create", "alice", "--role", "alpha=admin", "--expires", "30d"
    )
    secret = created["secret"]
    key_id = created["key"]["keyId"]
    assert secret.startswith(f"ftk_{key_id}_")
    assert created["key"]["roles"] == [{"team": "alpha", "role": "ROLE_ADMIN"}]

    # Alice (a team admin) lists her team's keys: no secrets anywhere in the output.
    listed = await _cli(address, secret, "keys", "list", "--team", "alpha", "--output", "json")
    assert listed.exit_code == 0, listed.output
    assert key_id in listed.stdout
    assert secret.removeprefix(f"ftk_{key_id}_") not in listed.stdout
    teams = await _json(address, secret, "teams", "list")
    assert [t["name"] for t in teams["teams"]] == ["alpha"]
    table = await _cli(address, secret, "keys", "list")
    assert table.exit_code == 0
    assert "alice" in table.stdout
    assert "alpha=admin" in table.stdout

    # Table output prints the key itself once, on its own line.
    made = await _cli(address, secret, "keys", "create", "bob", "--role", "alpha=viewer")
    assert made.exit_code == 0, made.output
    bob = next(line for line in made.stdout.splitlines() if line.startswith("ftk_"))
    assert (await _json(address, bob, "teams", "list"))["teams"][0]["name"] == "alpha"

    revoked = await _json(address, admin, "keys", "revoke", key_id)
    assert "revokedAt" in revoked
    refused = await _cli(address, secret, "teams", "list")
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1
    assert refused.output.startswith("error: UNAUTHENTICATED: API key")
    assert "revoked" in refused.output


async def test_bad_input_is_one_line(registry: tuple[RegistryApp, str]) -> None:
    reg, admin = registry
    for argv in (
        ("keys", "create", "x", "--role", "alpha=boss"),
        ("keys", "create", "x"),
        ("keys", "create", "x", "--role", "alpha=viewer", "--expires", "soon"),
        ("keys", "revoke", "../etc/passwd"),
        ("teams", "create", "bad name"),
    ):
        result = await _cli(reg.address, admin, *argv)
        assert result.exit_code == 2, (argv, result.output)
        assert result.output.startswith("error: ")
        assert result.output.count("\n") == 1
    # A team admin may not mint a platform admin: PERMISSION_DENIED, server-side (exit 1).
    await _json(reg.address, admin, "teams", "create", "beta")
    beta_admin = (await _json(reg.address, admin, "keys", "create", "b", "--role", "beta=admin"))[
        "secret"
    ]
    result = await _cli(reg.address, beta_admin, "keys", "create", "root", "--platform-admin")
    assert result.exit_code == 1
    assert result.output.startswith("error: PERMISSION_DENIED")


def test_role_and_expiry_parsing() -> None:
    assert parse_role("support=trainer") == ("support", registry_pb2.ROLE_TRAINER)
    for bad in ("support", "=admin", "support=owner"):
        with pytest.raises(CliError):
            parse_role(bad)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_expiry("30d", now) == now + timedelta(days=30)
    assert parse_expiry("12h", now) == now + timedelta(hours=12)
    assert parse_expiry("2031-02-03T04:05:06", now) == datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    with pytest.raises(CliError):
        parse_expiry("tomorrow", now)
