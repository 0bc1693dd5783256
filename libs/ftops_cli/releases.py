"""``ftops route get|set`` and ``ftops release start|status|promote|rollback|history``."""

from __future__ import annotations

from typing import Annotated

import typer

from ftops.gateway.v1 import gateway_pb2
from ftops.monitor.v1 import monitor_pb2
from ftops_cli.errors import CliError
from ftops_cli.output import (
    Output,
    OutputOption,
    or_dash,
    print_fields,
    print_json,
    print_table,
    to_dict,
    when,
)
from ftops_cli.runner import run
from ftops_client import FtopsClient

route_app = typer.Typer(help="Gateway routes (alias → version).", no_args_is_help=True)
release_app = typer.Typer(help="Canary releases.", no_args_is_help=True)


def parse_steps(text: str) -> list[int]:
    """``"5,25,50,100"`` → ``[5, 25, 50, 100]`` (the gateway checks the range and order)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"--steps must be comma-separated integers, got {text!r}") from None


def _route_fields(route: gateway_pb2.Route) -> list[tuple[str, object]]:
    stable = 100 - route.candidate_weight if route.candidate_version_id else 100
    fields: list[tuple[str, object]] = [
        ("stable", f"{or_dash(route.stable_version_id)} ({stable}%)"),
    ]
    if route.candidate_version_id:
        fields += [
            ("candidate", f"{route.candidate_version_id} ({route.candidate_weight}%)"),
            ("release", route.release_id),
            ("steps", ", ".join(f"{s}%" for s in route.steps)),
            ("step", f"{route.step_index + 1}/{len(route.steps)}"),
        ]
    fields += [("previous", or_dash(route.previous_version_id)), ("revision", route.revision)]
    return fields


def _show_route(route: gateway_pb2.Route, output: Output) -> None:
    if output is Output.json:
        print_json(route)
    else:
        print_fields(f"route {route.alias}", _route_fields(route))


def _show_analysis(analysis: monitor_pb2.ReleaseAnalysis, output: Output) -> None:
    if output is Output.json:
        print_json(analysis)
        return
    fields: list[tuple[str, object]] = [
        ("release", or_dash(analysis.release_id)),
        ("state", analysis.state),
        ("weight", f"{analysis.weight}%"),
        ("last decision", or_dash(analysis.last_decision)),
        ("reason", or_dash(analysis.last_reason)),
    ]
    for arm, stats in (("stable", analysis.stable), ("candidate", analysis.candidate)):
        if stats.version_id:
            fields.append(
                (
                    arm,
                    f"{stats.version_id}: {stats.requests} requests, "
                    f"error rate {stats.error_rate:.3f}, p95 {stats.latency_p95_ms:.0f} ms",
                )
            )
    print_fields(f"release of {analysis.alias}", fields)


@route_app.command("get")
def route_get(ctx: typer.Context, alias: str, output: OutputOption = Output.table) -> None:
    """Show where an alias sends traffic."""

    async def work(client: FtopsClient) -> None:
        _show_route(await client.get_route(alias), output)

    run(ctx, work)


@route_app.command("set")
def route_set(
    ctx: typer.Context, alias: str, version: str, output: OutputOption = Output.table
) -> None:
    """Send all of an alias's traffic to one version."""

    async def work(client: FtopsClient) -> None:
        _show_route(await client.set_route(alias, version), output)

    run(ctx, work)


@release_app.command("start")
def release_start(
    ctx: typer.Context,
    alias: str,
    candidate: str,
    steps: Annotated[
        str, typer.Option(help="candidate weights in %, e.g. 5,25,50,100 (default: the gateway's)")
    ] = "",
    min_requests: Annotated[
        int, typer.Option(min=0, help="requests per arm before a decision")
    ] = 0,
    max_error_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.0,
    manual: Annotated[
        bool, typer.Option("--manual", help="no automatic decisions: promote by hand")
    ] = False,
    output: OutputOption = Output.table,
) -> None:
    """Start a canary of CANDIDATE on ALIAS."""

    async def work(client: FtopsClient) -> None:
        route = await client.start_release(
            alias,
            candidate,
            steps=parse_steps(steps),
            min_requests=min_requests,
            max_error_rate=max_error_rate,
            auto=not manual,
        )
        _show_route(route, output)

    run(ctx, work)


@release_app.command("status")
def release_status(ctx: typer.Context, alias: str, output: OutputOption = Output.table) -> None:
    """The gateway's route and the monitor's analysis of the release."""

    async def work(client: FtopsClient) -> None:
        status = await client.release_status(alias)
        if output is Output.json:
            print_json({"route": to_dict(status.route), "analysis": to_dict(status.analysis)})
            return
        _show_route(status.route, output)
        _show_analysis(status.analysis, output)

    run(ctx, work)


ReasonOption = Annotated[str, typer.Option(help="recorded with the decision")]


@release_app.command("promote")
def release_promote(
    ctx: typer.Context, alias: str, reason: ReasonOption = "", output: OutputOption = Output.table
) -> None:
    """Move the release to its next step (the last step is the final promotion)."""

    async def work(client: FtopsClient) -> None:
        _show_analysis(await client.promote(alias, reason), output)

    run(ctx, work)


@release_app.command("rollback")
def release_rollback(
    ctx: typer.Context, alias: str, reason: ReasonOption = "", output: OutputOption = Output.table
) -> None:
    """Send all traffic back to the stable (or, after promotion, the previous) version."""

    async def work(client: FtopsClient) -> None:
        _show_analysis(await client.rollback(alias, reason), output)

    run(ctx, work)


@release_app.command("history")
def release_history(ctx: typer.Context, alias: str, output: OutputOption = Output.table) -> None:
    """The releases of an alias and every decision the registry recorded, newest first."""

    async def work(client: FtopsClient) -> None:
        resp = await client.list_releases(alias)
        if output is Output.json:
            print_json(resp)
            return
        if not resp.releases:
            typer.echo(f"no releases of {alias}")
        for rel in resp.releases:
            print_table(
                f"{rel.release_id} {rel.state}: {rel.stable_version_id} → "
                f"{rel.candidate_version_id} (started {when(rel.started_at)})",
                ("when", "decision", "weight", "final", "manual", "reason"),
                (
                    (when(d.occurred_at), d.kind, f"{d.weight}%", d.final, d.manual, d.reason)
                    for d in rel.history
                ),
            )

    run(ctx, work)
