"""The ``ftops`` Typer app: global options, ``up`` and the commands and command groups."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ftops_cli import keys, monitor, registry, releases, train
from ftops_cli.errors import EXIT_CODES_HELP, EXIT_INTERRUPTED, fail
from ftops_cli.generate import generate
from ftops_cli.group import OneLineErrorsGroup
from ftops_cli.runner import State, state
from ftops_client import Endpoints

app = typer.Typer(
    name="ftops",
    cls=OneLineErrorsGroup,
    help="Operate ftops: train adapter versions, route and release them, query the registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    epilog=EXIT_CODES_HELP,
)
app.add_typer(train.jobs_app, name="jobs")
app.add_typer(releases.route_app, name="route")
app.add_typer(releases.release_app, name="release")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(keys.teams_app, name="teams")
app.command("train")(train.train)
app.command("versions")(registry.versions)
app.command("lineage")(registry.lineage)
app.command("generate")(generate)
app.command("feedback")(monitor.feedback)
app.command("alerts")(monitor.alerts)
app.command("stats")(monitor.stats)


def _address(service: str) -> object:
    return typer.Option(
        f"--{service}",
        metavar="HOST:PORT",
        help=f"{service} address (env FTOPS_{service.upper()}_ADDRESS)",
        show_default=False,
    )


def _file(what: str, env: str) -> object:
    return typer.Option(metavar="PEM", help=f"{what} (env {env})", show_default=False)


@app.callback()
def main(
    ctx: typer.Context,
    gateway: Annotated[str | None, _address("gateway")] = None,
    trainer: Annotated[str | None, _address("trainer")] = None,
    registry_: Annotated[str | None, _address("registry")] = None,
    monitor_: Annotated[str | None, _address("monitor")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (env FTOPS_API_KEY)", show_default=False)
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            help="TLS to the services (env FTOPS_TLS; on by itself with --tls-ca)",
            show_default=False,
        ),
    ] = None,
    tls_ca: Annotated[
        str | None, _file("CA bundle the services' certificates chain to", "FTOPS_TLS_CA_FILE")
    ] = None,
    tls_cert: Annotated[
        str | None, _file("client certificate (mutual TLS)", "FTOPS_TLS_CLIENT_CERT_FILE")
    ] = None,
    tls_key: Annotated[str | None, _file("its private key", "FTOPS_TLS_CLIENT_KEY_FILE")] = None,
) -> None:
    """Global options go before the command."""
    ctx.obj = State(
        Endpoints.from_env(gateway=gateway, trainer=trainer, registry=registry_, monitor=monitor_),
        api_key=api_key,
        debug=debug,
        tls=tls,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def up(ctx: typer.Context) -> None:
    """Start the local stack and the demo (ftops-dev up: `ftops up --help` lists flags)."""
    # Delegated whole, flags included, so `ftops up` never lags behind the dev stack.
    from ftops_devstack.__main__ import main as devstack_main

    saved = sys.argv
    sys.argv = ["ftops up", "up", *ctx.args]
    try:
        devstack_main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            typer.echo(f"error: {done.code}", err=True)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception as exc:
        fail(exc, debug=state(ctx).debug)
    finally:
        sys.argv = saved
    raise typer.Exit(code)
