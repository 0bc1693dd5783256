"""The ``ftops`` Typer app: global options, ``up``, ``generate`` and the command groups."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from ftops_cli import keys, registry, releases, train
from ftops_cli.errors import EXIT_INTERRUPTED
from ftops_cli.runner import State, run
from ftops_client import Endpoints, FtopsClient

app = typer.Typer(
    name="ftops",
    help="Operate ftops: train adapter versions, route and release them, query the registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    epilog="Exit codes: 0 ok, 1 server-side failure, 2 usage/input error, 3 stack unreachable,"
    " 4 watched job FAILED/CANCELLED, 130 Ctrl-C (a watched job keeps running).",
)
app.add_typer(train.jobs_app, name="jobs")
app.add_typer(releases.route_app, name="route")
app.add_typer(releases.release_app, name="release")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(keys.teams_app, name="teams")
app.command("train")(train.train)
app.command("versions")(registry.versions)
app.command("lineage")(registry.lineage)


def _address(service: str) -> object:
    return typer.Option(
        f"--{service}",
        metavar="HOST:PORT",
        help=f"{service} address (env FTOPS_{service.upper()}_ADDRESS)",
        show_default=False,
    )


@app.callback()
def main(
    ctx: typer.Context,
    gateway: Annotated[str | None, _address("gateway")] = None,
    trainer: Annotated[str | None, _address("trainer")] = None,
    registry_: Annotated[str | None, _address("registry")] = None,
    monitor: Annotated[str | None, _address("monitor")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (env FTOPS_API_KEY)", show_default=False)
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    """Exit codes: 0 ok, 1 server-side failure, 2 usage/input error, 3 stack unreachable,
    4 watched job FAILED/CANCELLED, 130 Ctrl-C."""
    ctx.obj = State(
        Endpoints.from_env(gateway=gateway, trainer=trainer, registry=registry_, monitor=monitor),
        api_key=api_key,
        debug=debug,
    )


@app.command()
def up(
    workdir: Annotated[str, typer.Option(help="state: registry db, artifacts, logs")] = (
        ".ftops/dev"
    ),
    fresh: Annotated[bool, typer.Option("--fresh", help="wipe the workdir first")] = False,
    no_demo: Annotated[bool, typer.Option("--no-demo")] = False,
    exit_after_demo: Annotated[bool, typer.Option("--exit-after-demo")] = False,
    nats_port: Annotated[int, typer.Option()] = 4222,
    redis_port: Annotated[int, typer.Option()] = 6379,
) -> None:
    """Start the local stack (and run the demo), like `ftops-dev up`."""
    import argparse

    from ftops_devstack.__main__ import _up

    args = argparse.Namespace(
        workdir=workdir,
        fresh=fresh,
        no_demo=no_demo,
        exit_after_demo=exit_after_demo,
        nats_port=nats_port,
        redis_port=redis_port,
    )
    try:
        code = asyncio.run(_up(args))
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    raise typer.Exit(code)


@app.command()
def generate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="an alias or a version id")],
    prompt: str,
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0)] = 0.0,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
) -> None:
    """Generate through the gateway, streaming tokens to stdout."""

    async def work(client: FtopsClient) -> None:
        stream = client.generate_stream(
            model, prompt, max_tokens=max_tokens, temperature=temperature, seed=seed
        )
        async for chunk in stream:
            typer.echo(chunk.text, nl=False)
        typer.echo()

    run(ctx, work)
