"""``ftops versions`` and ``ftops lineage``."""

from __future__ import annotations

import typer

from ftops.registry.v1 import registry_pb2
from ftops_cli.output import Output, OutputOption, or_dash, print_json, print_table, when
from ftops_cli.runner import run
from ftops_client import FtopsClient


def version_state(version: registry_pb2.Version) -> str:
    """ready, rejected (by the evaluation gate: never served), and archived when it is."""
    state = version.state or "ready"
    return f"{state}, archived" if version.archived else state


def versions(ctx: typer.Context, adapter: str, output: OutputOption = Output.table) -> None:
    """List an adapter's versions."""

    async def work(client: FtopsClient) -> None:
        resp = await client.list_versions(adapter)
        if output is Output.json:
            print_json(resp)
            return
        print_table(
            f"versions of {adapter}",
            ("#", "version", "state", "parent", "base model", "job", "created"),
            (
                (
                    v.number,
                    v.version_id,
                    version_state(v),
                    or_dash(v.parent_version_id),
                    v.base_model,
                    or_dash(v.job_id),
                    when(v.created_at),
                )
                for v in resp.versions
            ),
        )

    run(ctx, work)


def lineage(ctx: typer.Context, version: str, output: OutputOption = Output.table) -> None:
    """A version's ancestry, newest first, down to the base model."""

    async def work(client: FtopsClient) -> None:
        resp = await client.lineage(version)
        if output is Output.json:
            print_json(resp)
            return
        rows: list[tuple[object, ...]] = [
            (f"{v.adapter} v{v.number}", v.version_id, or_dash(v.job_id), when(v.created_at))
            for v in resp.chain
        ]
        base = resp.base_model
        rows.append((f"base {base.name}", base.fingerprint[:16], "-", when(base.created_at)))
        print_table(f"lineage of {version}", ("", "version", "job", "created"), rows)

    run(ctx, work)
