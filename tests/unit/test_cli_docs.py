"""Every command takes ``--output`` (bar ``up``) and docs/cli.md shows each with an example."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer.main

from ftops_cli.app import app
from ftops_cli.errors import EXIT_CODES_HELP

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


# Typer ships its own copy of Click: groups are recognised by their ``commands``.
def _commands(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, command in group.commands.items():
        path = (*prefix, name)
        if hasattr(command, "commands"):
            yield from _commands(command, path)
        else:
            yield path, command


def _all() -> list[tuple[tuple[str, ...], Any]]:
    return list(_commands(typer.main.get_command(app)))


def test_every_command_but_up_takes_output() -> None:
    commands = _all()
    assert len(commands) > 20
    missing = [
        " ".join(path)
        for path, command in commands
        if path != ("up",) and not any("--output" in p.opts for p in command.params)
    ]
    assert not missing, missing


def test_docs_show_every_command_with_an_example() -> None:
    text = DOCS.read_text()
    examples = [line.strip() for line in text.splitlines() if line.startswith("    ")]
    missing = []
    for path, _ in _all():
        usage = "ftops " + " ".join(path)
        if not any(line.startswith(usage) or line.startswith(f"$ {usage}") for line in examples):
            missing.append(usage)
    assert not missing, f"docs/cli.md has no example for: {missing}"


def test_docs_list_the_exit_codes_the_cli_uses() -> None:
    text = DOCS.read_text()
    for code in ("0", "1", "2", "3", "4", "5", "6", "130"):
        assert f"| {code} |" in text
        assert code in EXIT_CODES_HELP
