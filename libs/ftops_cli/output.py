"""``--output json|table``: JSON is ``MessageToDict`` output and nothing else on stdout;
tables are Rich tables."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Annotated, Any

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ftops.events.v1 import events_pb2


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOption = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for scripts")
]


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message)


def print_json(data: Message | dict[str, Any]) -> None:
    payload = to_dict(data) if isinstance(data, Message) else data
    typer.echo(json.dumps(payload, indent=2))


def console() -> Console:
    return Console(soft_wrap=False)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        # Cells are data (a dataset's text, a server's message), never Rich markup.
        t.add_row(*(escape(str(cell)) for cell in row))
    return t


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    console().print(table(title, columns, rows))


def print_fields(title: str, fields: Iterable[tuple[str, object]]) -> None:
    print_table(title, ("field", "value"), fields)


def when(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def job_state(state: int) -> str:
    return events_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def or_dash(value: object) -> str:
    return str(value) if value not in ("", None) else "-"
