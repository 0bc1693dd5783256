"""Global options (kept on the Typer context) and running one async command with them."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import typer

from ftops_cli.errors import EXIT_INTERRUPTED, EXIT_OK, fail
from ftops_client import Endpoints, FtopsClient
from ftops_client.tls import client_tls

T = TypeVar("T")


@dataclass
class State:
    endpoints: Endpoints = field(default_factory=Endpoints.from_env)
    api_key: str | None = None
    debug: bool = False
    # None: from the environment (FTOPS_TLS, FTOPS_TLS_CA_FILE, ...: ftops_client.tls).
    tls: bool | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def client(self) -> FtopsClient:
        # Read here, inside run(): a bad file is one line on stderr, not a traceback.
        tls = client_tls(
            enabled=self.tls, ca_file=self.tls_ca, cert_file=self.tls_cert, key_file=self.tls_key
        )
        return FtopsClient(self.endpoints, api_key=self.api_key, tls=tls)


def state(ctx: typer.Context) -> State:
    found = ctx.find_object(State)
    return found if found is not None else State()


def run(
    ctx: typer.Context,
    work: Callable[[FtopsClient], Coroutine[Any, Any, T]],
    *,
    on_interrupt: Callable[[], str] | None = None,
) -> T:
    """Run ``work`` with a client; errors become one line on stderr and an exit code."""
    st = state(ctx)

    async def main() -> T:
        async with st.client() as client:
            return await work(client)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        message = on_interrupt() if on_interrupt is not None else "interrupted"
        typer.echo(message, err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except BrokenPipeError:
        # The reader stopped reading (`ftops ... | head -1`): it has what it wanted.
        silence_stdout()
        raise typer.Exit(EXIT_OK) from None
    except Exception as exc:
        fail(exc, debug=st.debug)


def silence_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's last flush of what is still buffered
    would otherwise hit the closed pipe again and print a traceback."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
