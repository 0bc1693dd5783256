"""Errors become one line on stderr and a documented exit code; no stack needed."""

from __future__ import annotations

import socket

import grpc
import pytest
from typer.testing import CliRunner

from ftops_cli.app import app
from ftops_cli.errors import (
    EXIT_JOB_FAILED,
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_UNAVAILABLE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    exit_code_for,
    message_for,
)
from ftops_cli.releases import parse_flag, parse_steps
from ftops_client import FtopsClientError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _error(code: str, unreachable: bool = False) -> FtopsClientError:
    return FtopsClientError(
        code, "model 'x' is unknown", "127.0.0.1:50055", "gateway", unreachable=unreachable
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("INVALID_ARGUMENT", EXIT_USAGE),
        ("OUT_OF_RANGE", EXIT_USAGE),
        ("NOT_FOUND", EXIT_NOT_FOUND),
        ("FAILED_PRECONDITION", EXIT_REFUSED),
        ("ALREADY_EXISTS", EXIT_REFUSED),
        ("ABORTED", EXIT_REFUSED),
        ("UNAVAILABLE", EXIT_UNAVAILABLE),  # the server said so: retry later
        ("DEADLINE_EXCEEDED", EXIT_UNAVAILABLE),
        ("RESOURCE_EXHAUSTED", EXIT_UNAVAILABLE),  # rate limited or queue full
        # Credentials refused stay with server failures (tests/integration rely on 1).
        ("UNAUTHENTICATED", EXIT_SERVER),
        ("PERMISSION_DENIED", EXIT_SERVER),
        ("INTERNAL", EXIT_SERVER),
        ("DATA_LOSS", EXIT_SERVER),
    ],
)
def test_status_exit_codes(status: str, code: int) -> None:
    assert exit_code_for(_error(status)) == code


def test_exit_codes() -> None:
    assert EXIT_UNREACHABLE == EXIT_UNAVAILABLE == 3
    assert exit_code_for(_error("UNAVAILABLE", unreachable=True)) == EXIT_UNAVAILABLE
    assert exit_code_for(CliError("bad")) == EXIT_USAGE
    assert exit_code_for(CliError("failed", EXIT_JOB_FAILED)) == EXIT_JOB_FAILED
    assert exit_code_for(RuntimeError("boom")) == EXIT_SERVER


def test_messages_name_code_service_and_address() -> None:
    assert str(_error("NOT_FOUND")) == ("NOT_FOUND: model 'x' is unknown (gateway 127.0.0.1:50055)")
    down = str(_error("UNAVAILABLE", unreachable=True))
    assert "127.0.0.1:50055" in down
    assert "ftops up" in down
    assert "--debug" in message_for(RuntimeError("boom"))


@pytest.mark.parametrize(
    "argv",
    [
        ["route", "get", "bot"],
        ["release", "status", "bot"],
        ["release", "watch", "bot"],
        ["release", "list"],
        ["release", "pause", "bot"],
        ["jobs", "list"],
        ["versions", "bot", "--output", "json"],
        ["generate", "bot", "hello"],
    ],
)
def test_unreachable_stack_exits_3_with_one_line(argv: list[str]) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    overrides = [f"--{s}={address}" for s in ("gateway", "trainer", "registry", "monitor")]
    result = CliRunner().invoke(app, [*overrides, *argv])
    assert result.exit_code == EXIT_UNREACHABLE, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: UNAVAILABLE: cannot reach the ")
    assert address in lines[0]
    assert "ftops up" in lines[0]


def test_env_overrides_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("FTOPS_REGISTRY_ADDRESS", address)
    result = CliRunner().invoke(app, ["lineage", "ver_x"])
    assert result.exit_code == EXIT_UNREACHABLE
    assert f"registry {address}" in result.stderr


def test_debug_prints_the_traceback() -> None:
    address = f"127.0.0.1:{_free_port()}"
    result = CliRunner().invoke(app, ["--debug", f"--gateway={address}", "route", "get", "bot"])
    assert result.exit_code == EXIT_UNREACHABLE
    assert "Traceback" in result.stderr


def test_bad_flags_are_usage_errors() -> None:
    result = CliRunner().invoke(app, ["release", "start", "bot", "ver_1", "--steps", "5,x"])
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.strip() == "error: --steps must be comma-separated integers, got '5,x'"
    result = CliRunner().invoke(app, ["versions", "bot", "--output", "yaml"])
    assert result.exit_code == EXIT_USAGE


def test_parse_flag() -> None:
    rule = parse_flag("name=staff; tenant=acme,globex; user=u1; meta.team=x; arm=stable")
    assert (rule.name, list(rule.tenants), list(rule.users)) == (
        "staff",
        ["acme", "globex"],
        ["u1"],
    )
    assert (dict(rule.metadata), rule.arm) == ({"team": "x"}, "stable")
    for bad in ("tenant", "color=red", "user="):
        with pytest.raises(CliError):
            parse_flag(bad)
    result = CliRunner().invoke(app, ["release", "start", "bot", "ver_1", "--flag", "x=1"])
    assert result.exit_code == EXIT_USAGE
    assert "--flag key 'x'" in result.stderr


def test_parse_steps() -> None:
    assert parse_steps("5,25,50,100") == [5, 25, 50, 100]
    assert parse_steps("") == []


def test_transport_failures_are_unreachable() -> None:
    class FakeRpcError(grpc.aio.AioRpcError):  # type: ignore[misc]
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    refused = FakeRpcError(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: Connection refused",
    )
    assert FtopsClientError.from_rpc(refused, "trainer", "h:1").unreachable
    busy = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "no replica has ver_1 loaded")
    err = FtopsClientError.from_rpc(busy, "gateway", "h:2")
    assert not err.unreachable
    assert str(err) == "UNAVAILABLE: no replica has ver_1 loaded (gateway h:2)"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bogus"], "No such command 'bogus'"),
        (["versions"], "Missing argument 'adapter'"),
        (["versions", "bot", "--outptu", "json"], "Possible options: --output"),
        (["feedback", "req_1", "2"], "Invalid value for 'score'"),
        (["generate", "bot", "hi", "--top-p", "3"], "Invalid value for '--top-p'"),
        (["versions", "bot", "--gateway", "h:1"], "--gateway is a global option"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(argv: list[str], needle: str) -> None:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert needle in lines[0]
    assert "--help" in lines[0] or "global option" in lines[0]


def test_a_group_without_a_command_shows_its_help() -> None:
    result = CliRunner().invoke(app, ["release"])
    assert result.exit_code == EXIT_USAGE
    assert "promote" in result.stdout
    assert result.stderr == ""
