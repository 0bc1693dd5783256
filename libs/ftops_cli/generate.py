"""``ftops generate``: stream a completion through the gateway."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Annotated

import typer

from ftops.common.v1 import common_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_cli.errors import CliError
from ftops_cli.output import Output, to_dict
from ftops_cli.runner import run
from ftops_client import FtopsClient


def parse_meta(items: Iterable[str]) -> dict[str, str]:
    """``["team=support", "plan=pro"]`` → ``{"team": "support", "plan": "pro"}``."""
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--meta must be KEY=VALUE, got {item!r}")
        if key.strip() in metadata:
            raise CliError(f"--meta {key.strip()!r} is given twice")
        metadata[key.strip()] = value.strip()
    return metadata


def finish_reason(value: int) -> str:
    name = common_pb2.FinishReason.Name(value)  # type: ignore[arg-type]
    return name.removeprefix("FINISH_REASON_").lower()


def summary(last: gateway_pb2.GenerateChunk) -> str:
    """The line on stderr after the text: what `ftops feedback` needs and who answered.
    ``last``: the stream's chunks merged (``completion_tokens`` is a running count)."""
    arm = f" ({last.arm})" if last.arm else ""
    reason = finish_reason(last.finish_reason) if last.finish_reason else "unknown"
    return (
        f"request {last.request_id or '-'} · {last.version_id or '-'}{arm} · "
        f"{last.completion_tokens} tokens · finished: {reason}"
    )


def generate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="an alias, a version id, adapter:number or base")],
    prompt: Annotated[str, typer.Argument(help="the prompt; - reads it from stdin")],
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0, help="0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="0 or 1: off")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="0: off")] = 0,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="stop sequence, repeatable", show_default=False)
    ] = None,
    user: Annotated[str, typer.Option(help="user/session key (flag rules, sticky split)")] = "",
    tenant: Annotated[str, typer.Option(help="tenant (flag rules)")] = "",
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", help="KEY=VALUE request metadata for flag rules, repeatable"),
    ] = None,
    request_id: Annotated[
        str, typer.Option(help="your own request id (default: the gateway makes one)")
    ] = "",
    output: Annotated[
        Output, typer.Option("--output", "-o", help="table: the text; json: one object per chunk")
    ] = Output.table,
) -> None:
    """Generate through the gateway, streaming tokens to stdout.

    The request id, the version and the arm that answered follow on stderr; give the
    request id to `ftops feedback`."""

    async def work(client: FtopsClient) -> None:
        # Parsed in here so a mistake is reported like every other error (one line).
        metadata = parse_meta(meta or [])
        text = sys.stdin.read() if prompt == "-" else prompt
        if not text.strip():
            raise CliError("the prompt is empty")
        stream = client.generate_stream(
            model,
            text,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop or (),
            tenant=tenant,
            user=user,
            metadata=metadata,
            request_id=request_id,
        )
        last = gateway_pb2.GenerateChunk()
        async for chunk in stream:
            if output is Output.json:
                typer.echo(json.dumps(to_dict(chunk)))
            else:
                typer.echo(chunk.text, nl=False)
            # Merged, so ids sent once and the final finish reason both survive.
            last.MergeFrom(chunk)
        if output is Output.table:
            typer.echo()
            typer.echo(summary(last), err=True)

    run(ctx, work)
