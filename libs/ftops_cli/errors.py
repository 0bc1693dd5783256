"""Exit codes and the one-line error report.

0    ok
1    a server-side failure (the service answered with a gRPC error)
2    usage or input error (bad flags, bad spec YAML, missing file, a dataset or spec the
     server refused as INVALID_ARGUMENT)
3    the stack is unreachable (nothing answers at the service's address)
4    a watched job ended FAILED, CANCELLED or REJECTED (by the evaluation gate)
130  Ctrl-C (a watched job keeps running; re-attach with `ftops jobs watch ID`)
"""

from __future__ import annotations

import sys
import traceback
from typing import NoReturn

import typer

from ftops_client import FtopsClientError

EXIT_OK = 0
EXIT_SERVER = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_JOB_FAILED = 4
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An error the CLI reports as one line and the given exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, CliError):
        return exc.exit_code
    if isinstance(exc, FtopsClientError):
        if exc.unreachable:
            return EXIT_UNREACHABLE
        # The server refused what the user sent (a bad dataset line, an unknown flag value).
        return EXIT_USAGE if exc.code_name == "INVALID_ARGUMENT" else EXIT_SERVER
    return EXIT_SERVER


def message_for(exc: BaseException) -> str:
    if isinstance(exc, CliError | FtopsClientError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)"


def fail(exc: BaseException, *, debug: bool = False) -> NoReturn:
    """Report ``exc`` on stderr (one line; the traceback too with --debug) and exit."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    one_line = "; ".join(line.strip() for line in message_for(exc).splitlines() if line.strip())
    typer.echo(f"error: {one_line}", err=True)
    raise typer.Exit(exit_code_for(exc))
