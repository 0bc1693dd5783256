"""``ftops route get|set`` and ``ftops release start|status|watch|pause|resume|promote|
rollback|list|history`` (the release API lives on the gateway; live figures come from the
monitor, history from the registry)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops.monitor.v1 import monitor_pb2
from ftops.registry.v1 import registry_pb2
from ftops_cli.analysis import analysis_view
from ftops_cli.errors import EXIT_JOB_FAILED, CliError
from ftops_cli.output import (
    Output,
    OutputOption,
    console,
    or_dash,
    print_fields,
    print_json,
    print_table,
    table,
    to_dict,
    when,
)
from ftops_cli.runner import run
from ftops_client import FtopsClient, FtopsClientError

route_app = typer.Typer(help="Gateway routes (alias → version).", no_args_is_help=True)
release_app = typer.Typer(
    help="Releases: canary, blue-green, shadow, flag rules, sticky split.", no_args_is_help=True
)


# Shown for options whose 0 means "the service decides" (a 0.0 default reads as "0% allowed").
SERVICE_DEFAULT = "service default"


class Strategy(StrEnum):
    canary = "canary"
    blue_green = "blue-green"
    shadow = "shadow"


STRATEGIES = {
    Strategy.canary: events_pb2.RELEASE_STRATEGY_CANARY,
    Strategy.blue_green: events_pb2.RELEASE_STRATEGY_BLUE_GREEN,
    Strategy.shadow: events_pb2.RELEASE_STRATEGY_SHADOW,
}


class Inconclusive(StrEnum):
    rollback = "rollback"
    promote = "promote"
    hold = "hold"


INCONCLUSIVE = {
    Inconclusive.rollback: events_pb2.INCONCLUSIVE_ACTION_ROLLBACK,
    Inconclusive.promote: events_pb2.INCONCLUSIVE_ACTION_PROMOTE,
    Inconclusive.hold: events_pb2.INCONCLUSIVE_ACTION_HOLD,
}


def parse_steps(text: str) -> list[int]:
    """``"5,25,50,100"`` → ``[5, 25, 50, 100]`` (the gateway checks the range and order)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"--steps must be comma-separated integers, got {text!r}") from None


def parse_flag(text: str) -> events_pb2.FlagRule:
    """``"name=staff;tenant=acme,globex;user=u1;meta.team=x;arm=stable"`` → a FlagRule.
    Every condition given must hold; ``arm`` defaults to candidate."""
    rule = events_pb2.FlagRule()
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise CliError(f"--flag part {part!r} must be KEY=VALUE (in {text!r})")
        values = [v.strip() for v in value.split(",") if v.strip()]
        if key in ("tenant", "tenants"):
            rule.tenants.extend(values)
        elif key in ("user", "users"):
            rule.users.extend(values)
        elif key.startswith("meta."):
            rule.metadata[key.removeprefix("meta.")] = value
        elif key == "name":
            rule.name = value
        elif key == "arm":
            rule.arm = value
        else:
            raise CliError(f"--flag key {key!r} is not one of name, tenant, user, meta.<key>, arm")
    return rule


def _strategy_name(value: int) -> str:
    for name, number in STRATEGIES.items():
        if number == value:
            return str(name)
    return "canary"


def _route_fields(route: gateway_pb2.Route) -> list[tuple[str, object]]:
    stable = 100 - route.candidate_weight if route.candidate_version_id else 100
    fields: list[tuple[str, object]] = [
        ("stable", f"{or_dash(route.stable_version_id)} ({stable}%)"),
    ]
    if route.candidate_version_id:
        fields += [
            ("candidate", f"{route.candidate_version_id} ({route.candidate_weight}%)"),
            ("release", route.release_id),
            ("strategy", _strategy_name(route.strategy)),
            ("steps", ", ".join(f"{s}%" for s in route.steps)),
            ("step", f"{route.step_index + 1}/{len(route.steps)}"),
        ]
        if route.shadow_percent:
            fields.append(("mirrored", f"{route.shadow_percent}% of stable requests"))
        if route.evidence_mirror_percent:
            fields.append(("evidence", _evidence_text(route)))
        if route.sticky:
            fields.append(("split", "sticky by user/session"))
        for rule in route.flags:
            fields.append(("flag", _flag_text(rule)))
        if route.paused:
            fields.append(("paused", "yes: no automatic decisions"))
    fields += [("previous", or_dash(route.previous_version_id)), ("revision", route.revision)]
    return fields


def _evidence_text(route: gateway_pb2.Route) -> str:
    """The canary's mirrored evidence: what the analysis sees beyond the step's weight."""
    share = route.evidence_mirror_percent
    if route.candidate_weight >= share:
        return f"{share}% (the step's own traffic; nothing mirrored)"
    if route.paused:
        return f"{share}% (not mirrored while paused)"
    mirrored = share - route.candidate_weight
    return f"{share}% ({route.candidate_weight}% answered + {mirrored}% mirrored from stable)"


def _flag_text(rule: events_pb2.FlagRule) -> str:
    parts = [f"tenant in {list(rule.tenants)}"] if rule.tenants else []
    if rule.users:
        parts.append(f"user in {list(rule.users)}")
    parts += [f"{k}={v}" for k, v in sorted(rule.metadata.items())]
    return f"{rule.name}: {' and '.join(parts)} → {rule.arm or 'candidate'}"


def _decision_text(decision: registry_pb2.ReleaseDecision) -> str:
    if not decision.kind:
        return "-"
    final = " (final)" if decision.final else ""
    manual = " by hand" if decision.manual else ""
    return f"{decision.kind} {decision.weight}%{final}{manual}"


def _figures_text(figures: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(figures.items())) or "-"


def release_fields(release: gateway_pb2.Release) -> list[tuple[str, object]]:
    route = release.route
    decision = route.last_decision
    fields: list[tuple[str, object]] = [
        ("release", or_dash(route.release_id)),
        ("state", or_dash(release.state)),
        ("strategy", _strategy_name(route.strategy)),
        ("stable", or_dash(route.release_stable_version_id or route.stable_version_id)),
        ("candidate", or_dash(route.release_candidate_version_id)),
    ]
    if release.state in ("running", "paused"):
        stable = 100 - route.candidate_weight
        fields.append(
            (
                "traffic",
                f"{route.stable_version_id} {stable}% / {route.candidate_version_id} "
                f"{route.candidate_weight}%",
            )
        )
        if route.steps:
            fields.append(
                (
                    "steps",
                    " → ".join(
                        f"[{s}%]" if i == route.step_index else f"{s}%"
                        for i, s in enumerate(route.steps)
                    ),
                )
            )
        if route.shadow_percent:
            fields.append(("mirrored", f"{route.shadow_percent}%"))
        if route.evidence_mirror_percent:
            fields.append(("evidence", _evidence_text(route)))
    fields += [
        ("last decision", _decision_text(decision)),
        ("reason", or_dash(decision.reason)),
        ("figures", _figures_text(dict(decision.figures))),
        ("started", or_dash(when(route.started_at))),
    ]
    if route.previous_version_id and route.HasField("hold_until"):
        held = "retired" if route.previous_retired else f"held until {when(route.hold_until)}"
        fields.append(("previous", f"{route.previous_version_id} ({held})"))
    return fields


def _show_release(release: gateway_pb2.Release, output: Output) -> None:
    if output is Output.json:
        print_json(release)
    else:
        print_fields(f"release of {release.route.alias}", release_fields(release))


def _show_route(route: gateway_pb2.Route, output: Output) -> None:
    if output is Output.json:
        print_json(route)
    else:
        print_fields(f"route {route.alias}", _route_fields(route))


def _show_analysis(analysis: monitor_pb2.ReleaseAnalysis, output: Output) -> None:
    if output is Output.json:
        print_json(analysis)
    else:
        console().print(analysis_view(analysis))


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
    strategy: Annotated[Strategy, typer.Option(help="how traffic moves")] = Strategy.canary,
    steps: Annotated[
        str, typer.Option(help="candidate weights in %, e.g. 5,25,50,100 (default: the gateway's)")
    ] = "",
    shadow_percent: Annotated[
        int | None,
        typer.Option(
            min=0, max=100, help="% of stable requests mirrored (default 100 blue-green/shadow)"
        ),
    ] = None,
    sticky: Annotated[
        bool, typer.Option("--sticky", help="split by user/session key, not per request")
    ] = False,
    flag: Annotated[
        list[str] | None,
        typer.Option(
            help="routing rule before the weights, repeatable: "
            "'name=staff;tenant=acme;user=u1,u2;meta.team=x;arm=candidate'"
        ),
    ] = None,
    hold_seconds: Annotated[
        float | None, typer.Option(min=0, help="keep the old stable this long after the switch")
    ] = None,
    evidence_mirror_percent: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=100,
            help="canary: % of traffic the candidate is judged on while a step is below it, "
            "topped up by mirroring stable requests (default 20, 0 = off)",
        ),
    ] = None,
    min_requests: Annotated[
        int,
        typer.Option(
            min=0,
            help="requests per arm before a decision (monitor's default: 20)",
            show_default=SERVICE_DEFAULT,
        ),
    ] = 0,
    max_error_rate: Annotated[
        float,
        typer.Option(
            min=0,
            max=1,
            help="candidate error rate (0..1) that rolls back (monitor's default: no "
            "absolute cap; errors are still tested against stable)",
            show_default=SERVICE_DEFAULT,
        ),
    ] = 0.0,
    max_latency_ratio: Annotated[
        float,
        typer.Option(
            min=0,
            help="largest candidate/stable p95 latency ratio (monitor's default: unchecked; "
            "latency is still tested against stable)",
            show_default=SERVICE_DEFAULT,
        ),
    ] = 0.0,
    alpha: Annotated[
        float,
        typer.Option(
            min=0,
            max=0.5,
            help="sequential test false alarms (monitor's default: 0.05)",
            show_default=SERVICE_DEFAULT,
        ),
    ] = 0.0,
    step_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="seconds a step may stay inconclusive (monitor's default: 300)",
            show_default=SERVICE_DEFAULT,
        ),
    ] = 0.0,
    on_inconclusive: Annotated[
        Inconclusive, typer.Option(help="what a step still inconclusive at its time limit does")
    ] = Inconclusive.rollback,
    max_divergence: Annotated[
        float,
        typer.Option(
            min=0,
            max=1,
            help="shadow: largest mean output divergence (monitor's default: unchecked)",
            show_default=SERVICE_DEFAULT,
        ),
    ] = 0.0,
    manual: Annotated[
        bool, typer.Option("--manual", help="no automatic decisions: promote by hand")
    ] = False,
    output: OutputOption = Output.table,
) -> None:
    """Start a release of CANDIDATE on ALIAS."""
    analysis = events_pb2.AnalysisSettings(
        min_requests=min_requests,
        max_error_rate=max_error_rate,
        max_latency_ratio=max_latency_ratio,
        auto=not manual,
        alpha=alpha,
        step_timeout_s=step_timeout,
        on_inconclusive=INCONCLUSIVE[on_inconclusive],
        max_divergence=max_divergence,
    )

    async def work(client: FtopsClient) -> None:
        route = await client.start_release(
            alias,
            candidate,
            strategy=STRATEGIES[strategy],
            steps=parse_steps(steps),
            analysis=analysis,
            flags=[parse_flag(text) for text in flag or []],
            shadow_percent=shadow_percent,
            sticky=sticky,
            hold_seconds=hold_seconds,
            evidence_mirror_percent=evidence_mirror_percent,
        )
        _show_route(route, output)

    run(ctx, work)


@release_app.command("status")
def release_status(ctx: typer.Context, alias: str, output: OutputOption = Output.table) -> None:
    """The gateway's route and the monitor's analysis of the release."""

    async def work(client: FtopsClient) -> None:
        route = await client.get_route(alias)
        release = await client.get_release(alias) if route.release_id else None
        analysis = None
        try:
            analysis = await client.release_analysis(alias)
        except FtopsClientError as exc:
            # The gateway's state stands on its own; the live figures are extra.
            if exc.code_name != "UNAVAILABLE":
                raise
            typer.echo(f"note: no live figures ({exc})", err=True)
        if output is Output.json:
            payload = {"route": to_dict(route)}
            if analysis is not None:
                payload["analysis"] = to_dict(analysis)
            if release is not None:
                payload["release"] = to_dict(release)
            print_json(payload)
            return
        if release is not None:
            _show_release(release, output)
        else:
            _show_route(route, output)
        if analysis is not None:
            _show_analysis(analysis, output)

    run(ctx, work)


ReasonOption = Annotated[str, typer.Option(help="recorded with the decision")]
ReleaseIdOption = Annotated[
    str, typer.Option("--release", help="act only if this is the alias's release")
]


@release_app.command("pause")
def release_pause(
    ctx: typer.Context,
    alias: str,
    reason: ReasonOption = "",
    release: ReleaseIdOption = "",
    output: OutputOption = Output.table,
) -> None:
    """Stop automatic decisions; traffic stays where it is."""

    async def work(client: FtopsClient) -> None:
        _show_release(await client.pause_release(alias, reason, release_id=release), output)

    run(ctx, work)


@release_app.command("resume")
def release_resume(
    ctx: typer.Context,
    alias: str,
    reason: ReasonOption = "",
    release: ReleaseIdOption = "",
    output: OutputOption = Output.table,
) -> None:
    """Let automatic decisions continue (the current step starts over)."""

    async def work(client: FtopsClient) -> None:
        _show_release(await client.resume_release(alias, reason, release_id=release), output)

    run(ctx, work)


@release_app.command("promote")
def release_promote(
    ctx: typer.Context,
    alias: str,
    reason: ReasonOption = "",
    final: Annotated[
        bool, typer.Option("--final", help="skip the remaining steps: all traffic now")
    ] = False,
    release: ReleaseIdOption = "",
    output: OutputOption = Output.table,
) -> None:
    """Move the release to its next step (the last step is the final promotion)."""

    async def work(client: FtopsClient) -> None:
        promoted = await client.promote_release(
            alias, reason, release_id=release, one_step=not final
        )
        _show_release(promoted, output)

    run(ctx, work)


@release_app.command("rollback")
def release_rollback(
    ctx: typer.Context,
    alias: str,
    reason: ReasonOption = "",
    release: ReleaseIdOption = "",
    output: OutputOption = Output.table,
) -> None:
    """Send all traffic back to the stable version (or undo a completed promotion)."""

    async def work(client: FtopsClient) -> None:
        current = await client.get_release(alias)
        back = await client.rollback_release(
            alias,
            reason,
            release_id=release or current.route.release_id,
            revert_promotion=current.state == "promoted",
        )
        _show_release(back, output)

    run(ctx, work)


@release_app.command("list")
def release_list(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="one alias, with its history")] = "",
    active: Annotated[bool, typer.Option("--active", help="running releases only")] = False,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    output: OutputOption = Output.table,
) -> None:
    """Running releases of every alias, or one alias's releases newest first."""

    async def work(client: FtopsClient) -> None:
        resp = await client.gateway_releases(alias, active_only=active, limit=limit)
        if output is Output.json:
            print_json(resp)
            return
        print_table(
            f"releases of {alias}" if alias else "active releases",
            ("release", "alias", "state", "strategy", "stable", "candidate", "weight", "last"),
            (
                (
                    r.route.release_id,
                    r.route.alias,
                    r.state,
                    _strategy_name(r.route.strategy),
                    or_dash(r.route.release_stable_version_id),
                    or_dash(r.route.release_candidate_version_id),
                    f"{r.route.candidate_weight}%" if r.state in ("running", "paused") else "-",
                    _decision_text(r.route.last_decision),
                )
                for r in resp.releases
            ),
        )

    run(ctx, work)


def _watch_view(
    release: gateway_pb2.Release, analysis: monitor_pb2.ReleaseAnalysis | None
) -> Group:
    parts: list[Table | Group] = [
        table(f"release of {release.route.alias}", ("field", "value"), release_fields(release))
    ]
    if analysis is not None and analysis.state != "none":
        parts.append(analysis_view(analysis))
    return Group(*parts)


@release_app.command("watch")
def release_watch(
    ctx: typer.Context,
    alias: str,
    refresh: Annotated[float, typer.Option(min=0.2, help="seconds between figure updates")] = 1.0,
    output: OutputOption = Output.table,
) -> None:
    """Follow a release's traffic split and figures until it finishes.

    Updates in place; with --output json, one JSON object per change. Exit 0 once the
    candidate is promoted, 4 if the release was rolled back or replaced."""

    async def work(client: FtopsClient) -> None:
        if output is Output.json:
            last = gateway_pb2.Release()
            async for release in client.watch_release(alias):
                typer.echo(json.dumps(to_dict(release)))
                last = release
            _check_outcome(last)
            return
        latest: list[gateway_pb2.Release] = []
        figures: list[monitor_pb2.ReleaseAnalysis] = []
        with Live(console=console(), auto_refresh=False) as live:

            def redraw() -> None:
                if latest:
                    live.update(_watch_view(latest[-1], figures[-1] if figures else None))
                    live.refresh()

            async def poll_figures() -> None:
                while True:
                    with contextlib.suppress(Exception):
                        figures[:] = [await client.release_analysis(alias)]
                        redraw()
                    await asyncio.sleep(refresh)

            poller = asyncio.create_task(poll_figures())
            try:
                async for release in client.watch_release(alias):
                    latest[:] = [release]
                    redraw()
            finally:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            # The last poll predates the release's end: the last frame shows the
            # monitor's analysis of the ended release, or none rather than a stale one.
            if latest:
                final = await final_analysis(client, alias, latest[-1])
                figures[:] = [final] if final is not None else []
            redraw()
        if latest:
            _check_outcome(latest[-1])

    run(ctx, work)


async def final_analysis(
    client: FtopsClient, alias: str, release: gateway_pb2.Release, wait: float = 3.0
) -> monitor_pb2.ReleaseAnalysis | None:
    """The monitor's analysis of ``release`` once it has seen the release end (it learns of
    the end from the bus, a moment after the gateway); None if it has not within ``wait``
    seconds or cannot say."""
    release_id = release.route.release_id
    deadline = time.monotonic() + wait
    while True:
        try:
            analysis = await client.release_analysis(alias)
        except FtopsClientError:
            return None
        if analysis.release_id != release_id:
            return None
        if analysis.state not in ("running", "paused") or release.state in ("running", "paused"):
            return analysis
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.2)


def _check_outcome(release: gateway_pb2.Release) -> None:
    """A watch that ends without the candidate promoted fails, so that scripts can chain
    ``ftops release watch ALIAS && next-step``."""
    if release.state in ("rolled_back", "replaced"):
        decision = release.route.last_decision
        why = f": {decision.reason}" if decision.reason else ""
        raise CliError(
            f"release {release.route.release_id} of {release.route.alias} ended "
            f"{release.state.replace('_', ' ')}{why}",
            EXIT_JOB_FAILED,
        )


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
