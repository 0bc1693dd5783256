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


# An instruct model asked without its chat template often ends at once.
EMPTY_HINT = (
    "the model ended without a token: an instruct (chat) model wants its chat template; try --chat"
)


def chat_turns(prompt: str, system: str) -> list[tuple[str, str]]:
    """The prompt as a user turn, after the system message when there is one."""
    return ([("system", system)] if system.strip() else []) + [("user", prompt)]


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
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="send the prompt as a user message, rendered with the base model's chat "
            "template (instruct models, adapters trained on chat-format data)",
        ),
    ] = False,
    system: Annotated[
        str, typer.Option(help="a system message before the prompt (implies --chat)")
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
        turns = chat_turns(text, system) if chat or system else []
        stream = client.generate_stream(
            model,
            "" if turns else text,
            messages=turns,
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
            if not turns and last.completion_tokens == 0:
                typer.echo(EMPTY_HINT, err=True)

    run(ctx, work)
