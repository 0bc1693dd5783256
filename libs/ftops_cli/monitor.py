"""``ftops feedback``, ``ftops alerts`` and ``ftops stats`` (the monitor's API)."""

from __future__ import annotations

from typing import Annotated

import typer

from ftops_cli.output import Output, OutputOption, print_fields, print_json, print_table, when
from ftops_cli.runner import run
from ftops_client import FtopsClient


def feedback(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="the id `ftops generate` printed")],
    score: Annotated[float, typer.Argument(min=0, max=1, help="0 (bad) .. 1 (good)")],
    comment: Annotated[str, typer.Option(help="kept with the score")] = "",
    output: OutputOption = Output.table,
) -> None:
    """Score an answer; the monitor counts it for the version that gave it.

    A second score for the same request replaces the first. Exit 5 (not found) when the
    monitor has not seen the request (yet, or any more)."""

    async def work(client: FtopsClient) -> None:
        resp = await client.submit_feedback(request_id, score, comment)
        if output is Output.json:
            print_json(resp)
            return
        print_fields(
            "feedback recorded",
            [
                ("request", resp.request_id),
                ("alias", resp.alias or "-"),
                ("version", resp.version_id or "-"),
                ("arm", resp.arm or "-"),
                ("score", f"{score:g}"),
                ("replaced", "yes: an earlier score" if resp.replaced else "no"),
            ],
        )

    run(ctx, work)


def alerts(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="one alias (default: all)")] = "",
    output: OutputOption = Output.table,
) -> None:
    """Alerts firing now."""

    async def work(client: FtopsClient) -> None:
        resp = await client.list_alerts(alias)
        if output is Output.json:
            print_json(resp)
            return
        if not resp.alerts:
            typer.echo(f"no alerts firing{f' for {alias}' if alias else ''}")
            return
        print_table(
            "alerts firing",
            ("rule", "alias", "version", "value", "threshold", "for", "since", "message"),
            (
                (
                    a.rule,
                    a.alias or "-",
                    a.version_id or "-",
                    f"{a.value:.4g}",
                    f"{a.threshold:.4g}",
                    f"{a.for_seconds:.0f}s",
                    when(a.meta.occurred_at) or "-",
                    a.message,
                )
                for a in resp.alerts
            ),
        )

    run(ctx, work)


def stats(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="one alias (default: all)")] = "",
    output: OutputOption = Output.table,
) -> None:
    """Per-version figures over the monitor's sliding window."""

    async def work(client: FtopsClient) -> None:
        resp = await client.version_stats(alias)
        if output is Output.json:
            print_json(resp)
            return
        if not resp.stats:
            typer.echo(f"no requests seen{f' for {alias}' if alias else ''} in the window")
            return
        window = max(s.window_seconds for s in resp.stats)
        print_table(
            f"versions, last {window:.0f}s",
            (
                "alias",
                "version",
                "requests",
                "error rate",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "ttft p50 ms",
                "tok/s",
                "feedback",
            ),
            (
                (
                    s.alias,
                    s.version_id,
                    s.requests,
                    f"{s.error_rate:.3f}",
                    f"{s.latency_p50_ms:.0f}",
                    f"{s.latency_p95_ms:.0f}",
                    f"{s.latency_p99_ms:.0f}",
                    f"{s.ttft_p50_ms:.0f}",
                    f"{s.tokens_per_second:.0f}",
                    f"{s.feedback_mean:.2f} (n={s.feedback_count})" if s.feedback_count else "-",
                )
                for s in resp.stats
            ),
        )

    run(ctx, work)
