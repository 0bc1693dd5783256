"""The root command group: usage errors (unknown command or flag, a bad or missing value)
are one line on stderr with exit 2, like every other ftops error, not a Rich panel."""

from __future__ import annotations

import contextlib
import importlib
import sys
from types import ModuleType
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from ftops_cli.errors import EXIT_SERVER, EXIT_USAGE


def _click_exceptions() -> ModuleType:
    # Typer >= 0.2x ships its own copy of Click; earlier versions use the click package.
    for name in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError):
            return importlib.import_module(name)
    raise ImportError("neither typer._click nor click is installed")


_CLICK = _click_exceptions()


def usage_line(exc: Any) -> str:
    """``No such option: --outptu. (see 'ftops versions --help')``"""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    root = ctx.find_root()
    option = getattr(exc, "option_name", None)
    if option and ctx is not root and any(option in p.opts for p in root.command.params):
        command = ctx.command_path.removeprefix(root.command_path).strip()
        return (
            f"{option} is a global option: it goes before the command "
            f"('{root.command_path} {option} ... {command} ...')"
        )
    return f"{message} (see '{ctx.command_path} --help')"


class OneLineErrorsGroup(TyperGroup):
    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        def call(standalone: bool) -> Any:
            return super(OneLineErrorsGroup, self).main(
                args, prog_name, complete_var, standalone, windows_expand_args, **extra
            )

        if not standalone_mode:
            return call(False)
        try:
            # Non-standalone: Click errors are raised to us, typer.Exit comes back as a code.
            code = call(False)
        except _CLICK.ClickException as exc:
            code = getattr(exc, "exit_code", EXIT_USAGE)
            if not exc.format_message():
                sys.exit(code)  # a group run without a command: its help is already shown
            _exit(f"error: {usage_line(exc)}", code)
        except _CLICK.Abort:
            _exit("error: aborted", EXIT_SERVER)
        sys.exit(code if isinstance(code, int) else 0)


def _exit(line: str, code: int) -> NoReturn:
    typer.echo(line, err=True)
    sys.exit(code)
