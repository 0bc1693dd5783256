"""Every `ftops ...` command in docs/runbook.md exists, with the flags it is shown with."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import typer.main

from ftops_cli.app import app

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"


def _invocations() -> list[str]:
    text = RUNBOOK.read_text()
    # Inline code spans may wrap over lines; code blocks are indented by four spaces.
    spans = [" ".join(span.split()) for span in re.findall(r"`(ftops [^`]+)`", text)]
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("ftops ")]
    return spans + lines


def _resolve(words: list[str]) -> tuple[Any, list[str], list[str]]:
    """The command the words name, the global options and the command's options."""
    root = typer.main.get_command(app)
    global_opts = [opt for param in root.params for opt in param.opts]
    command: Any = root
    rest = [word for word in words[1:] if not word.startswith("-")]
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]
    assert not hasattr(command, "commands"), f"no command in {' '.join(words)!r}"
    opts = [opt for param in command.params for opt in [*param.opts, *param.secondary_opts]]
    return command, global_opts, opts


def test_runbook_commands_and_flags_exist() -> None:
    invocations = _invocations()
    assert len(invocations) > 20
    for text in invocations:
        words = shlex.split(text.split("#")[0].replace("...", "X"))
        _, global_opts, known = _resolve(words)
        for word in words:
            flag = word.split("=")[0]
            if flag.startswith("--"):
                assert flag in known or flag in global_opts, f"{flag} in {text!r}"
