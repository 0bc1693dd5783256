"""Exit codes and the one-line error report.

0    ok
1    the server failed or refused the caller (INTERNAL, UNAUTHENTICATED, PERMISSION_DENIED,
     any gRPC status not listed below), or the CLI itself failed
2    usage or input error: bad flags (Click's own code for them), bad spec YAML, a missing
     file, or input the server refused as INVALID_ARGUMENT / OUT_OF_RANGE
3    unavailable, worth retrying: nothing answers at the service's address, or the service
     says it cannot serve now (UNAVAILABLE: draining, no replica has the version loaded;
     RESOURCE_EXHAUSTED: rate limited, queue full; DEADLINE_EXCEEDED)
4    what you watched ended badly: a job FAILED, CANCELLED or REJECTED (by the evaluation
     gate), a release rolled back or replaced (`ftops release watch`)
5    not found (NOT_FOUND: an unknown alias, version, job, release or request id)
6    refused in the current state (FAILED_PRECONDITION, ALREADY_EXISTS, ABORTED: promoting
     a release that is not running, a second release on an alias, a rejected version)
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
EXIT_UNAVAILABLE = 3
EXIT_JOB_FAILED = 4
EXIT_NOT_FOUND = 5
EXIT_REFUSED = 6
EXIT_INTERRUPTED = 130

# Kept for callers written before UNAVAILABLE answers shared the code with unreachable.
EXIT_UNREACHABLE = EXIT_UNAVAILABLE

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 server failure or auth refused, 2 usage/bad input, 3 unavailable"
    " (retry), 4 watched job failed or release rolled back, 5 not found, 6 refused in the current"
    " state, 130 Ctrl-C."
)

_BY_STATUS = {
    "INVALID_ARGUMENT": EXIT_USAGE,
    "OUT_OF_RANGE": EXIT_USAGE,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
    "RESOURCE_EXHAUSTED": EXIT_UNAVAILABLE,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "FAILED_PRECONDITION": EXIT_REFUSED,
    "ALREADY_EXISTS": EXIT_REFUSED,
    "ABORTED": EXIT_REFUSED,
}


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
            return EXIT_UNAVAILABLE
        return _BY_STATUS.get(exc.code_name, EXIT_SERVER)
    return EXIT_SERVER


def message_for(exc: BaseException) -> str:
    if isinstance(exc, CliError | FtopsClientError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)"


def one_line(message: str) -> str:
    """A multi-line server message on one line: lines joined by "; ", except after a line
    that introduces the next ones ("... 3 bad lines:"), which is followed by a space."""
    out = ""
    for line in (part.strip() for part in message.splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def fail(exc: BaseException, *, debug: bool = False) -> NoReturn:
    """Report ``exc`` on stderr (one line; the traceback too with --debug) and exit."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    typer.echo(f"error: {one_line(message_for(exc))}", err=True)
    raise typer.Exit(exit_code_for(exc))
