"""``ftops train`` and ``ftops jobs list|get|watch``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from ftops.events.v1 import events_pb2
from ftops.trainer.v1 import trainer_pb2
from ftops_cli.errors import EXIT_JOB_FAILED, CliError
from ftops_cli.output import Output, OutputOption, job_state, or_dash, print_fields, print_json
from ftops_cli.output import print_table as _print_table
from ftops_cli.runner import run
from ftops_cli.spec import build_job_spec, load_spec_file, validate
from ftops_client import FtopsClient, FtopsClientError

jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)

REJECTED = events_pb2.JOB_STATE_REJECTED
FAILED_STATES = (events_pb2.JOB_STATE_FAILED, events_pb2.JOB_STATE_CANCELLED, REJECTED)
# A rejection names the gate's thresholds; this says where they come from.
GATE_HINT = (
    "the gate's settings and scores: ftops jobs get {job_id}; per job: --min-retention, "
    "or 'min_retention:' / 'max_new_loss_ratio:' / 'gate: false' in --spec; the trainer's "
    "defaults: FTOPS_GATE_MIN_RETENTION, FTOPS_GATE_MIN_LEARNED (learned: exact match on "
    "its own training records; more steps or epochs help)"
)


def _detach_message(job_id: str) -> str:
    if not job_id:
        return "interrupted before the job was submitted"
    return (
        f"detached from job {job_id}; it keeps running. Re-attach with: ftops jobs watch {job_id}"
    )


def steps_note(job: trainer_pb2.Job, max_steps: int) -> str:
    """Why a job trains fewer steps than --max-steps asked for ("" when it does not)."""
    if not max_steps or not job.total_steps or job.total_steps >= max_steps:
        return ""
    epochs = job.spec.hyperparameters.num_epochs
    given = f"{epochs} epochs" if epochs else "the trainer's default epochs"
    return (
        f"note: job {job.job_id} trains {job.total_steps} steps, not max_steps {max_steps}: "
        f"{given} over its data end first (raise --num-epochs to train longer)"
    )


async def follow(
    client: FtopsClient, job_id: str, *, progress: bool = True, max_steps: int = 0
) -> trainer_pb2.Job:
    """Watch a job to its end with a live bar on stderr (step/total, loss, ETA); says so
    once if ``max_steps`` (what the caller asked for) does not bind."""
    job = trainer_pb2.Job(job_id=job_id)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        # The trainer's own estimate: it knows steps resumed from a checkpoint.
        TextColumn("ETA {task.fields[eta]}"),
        console=Console(stderr=True),
        transient=False,
        disable=not progress,
    )
    with bar:
        task: TaskID = bar.add_task(job_id, total=None, loss="-", tps="-", eta="-")
        noted = False
        async for update in client.watch_job(job_id):
            job = update
            if not noted and job.total_steps:
                noted = True
                if note := steps_note(job, max_steps):
                    bar.console.print(note, markup=False, highlight=False)
            bar.update(
                task,
                description=f"{job_id} {job_state(job.state).lower()}",
                total=job.total_steps or None,
                completed=job.step,
                loss=f"{job.loss:.4f}" if job.step else "-",
                tps=f"{job.tokens_per_second:.0f}" if job.step else "-",
                eta=_duration(job.eta_seconds) if job.step and job.step < job.total_steps else "-",
            )
    return job


async def route_if_unrouted(client: FtopsClient, alias: str, version_id: str) -> str:
    """Route ``alias`` to ``version_id`` if it has no route yet (a new adapter's first ready
    version), through the gateway that owns routes; what happened, as a line for stderr.
    Never fails the command: the version is registered either way."""
    how = f"route it with: ftops route set {alias} {version_id}"
    try:
        current = await client.get_route(alias)
    except FtopsClientError as exc:
        if exc.code_name != "NOT_FOUND":
            return f"note: could not read the route of {alias} ({exc}); {how}"
    else:
        serving = current.stable_version_id or "-"
        return (
            f"route {alias} unchanged (serves {serving}); release the new version with: "
            f"ftops release start {alias} {version_id}"
        )
    try:
        await client.set_route(alias, version_id)
    except FtopsClientError as exc:
        return f"note: {alias} has no route and routing it failed ({exc}); {how}"
    return f"route {alias} → {version_id} (the alias had no route: its first ready version)"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _report(job: trainer_pb2.Job, output: Output) -> None:
    if output is Output.json:
        print_json(job)
    else:
        _print_job(job)
    if job.state in FAILED_STATES:
        hint = f" ({GATE_HINT.format(job_id=job.job_id)})" if job.state == REJECTED else ""
        raise CliError(
            f"job {job.job_id} ended {job_state(job.state)}: "
            f"{job.error or 'no reason given'}{hint}",
            EXIT_JOB_FAILED,
        )


def _print_job(job: trainer_pb2.Job) -> None:
    records = f"{job.records_used}/{job.records_total} used, {job.records_skipped} skipped"
    print_fields(
        f"job {job.job_id}",
        [
            ("adapter", job.spec.adapter),
            ("state", job_state(job.state)),
            ("step", f"{job.step}/{job.total_steps}"),
            ("loss", f"{job.loss:.4f}" if job.step else "-"),
            ("records", records if job.records_total else "-"),
            ("lr", f"{job.learning_rate:.2e}" if job.step else "-"),
            ("tokens/s", f"{job.tokens_per_second:.0f}" if job.step else "-"),
            (
                "pipeline",
                or_dash(", ".join(f"{s.name} {s.records_in}->{s.records_out}" for s in job.stages)),
            ),
            ("skipped lines", _skipped(job)),
            ("replay", f"{job.replay_records} records" if job.replay_records else "-"),
            ("gate", _gate(job)),
            ("targets", or_dash(", ".join(job.spec.lora.target_modules))),
            ("parent", or_dash(job.spec.parent_version_id)),
            ("version", f"{job.version_id} (v{job.version_number})" if job.version_id else "-"),
            ("worker", f"{job.worker} (attempt {job.attempts})" if job.worker else "-"),
            ("error", or_dash(job.error)),
        ],
    )


def _skipped(job: trainer_pb2.Job) -> str:
    """The bad lines the trainer left out, one a line, as many as the record names."""
    lines = [f"line {s.line}: {s.reason}" for s in job.skipped_lines]
    if job.records_skipped > len(lines):
        lines.append(f"... and {job.records_skipped - len(lines)} more")
    return "\n".join(lines) or "-"


def _gate(job: trainer_pb2.Job) -> str:
    evaluation = job.evaluation
    if not evaluation.metrics:
        return "-"
    retention = evaluation.metrics.get("retention")
    shown = f", retention {retention:.3f}" if retention is not None else ""
    verdict = "passed" if evaluation.gate_passed else "refused: " + "; ".join(evaluation.reasons)
    return verdict + shown


def train(
    ctx: typer.Context,
    adapter: Annotated[str | None, typer.Option(help="adapter name (also the usual alias)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="JSONL dataset, sent inline")] = None,
    spec: Annotated[
        Path | None, typer.Option("--spec", help="YAML spec; flags given override its keys")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="base model (default: tiny-llama)")] = None,
    parent: Annotated[str | None, typer.Option(help="train from this version")] = None,
    team: Annotated[str | None, typer.Option()] = None,
    lora_r: Annotated[int | None, typer.Option(min=1)] = None,
    lora_alpha: Annotated[int | None, typer.Option(min=1)] = None,
    target_modules: Annotated[
        str | None,
        typer.Option(
            "--target-modules",
            help="modules to adapt, comma-separated (e.g. q_proj,v_proj); default: the base "
            "architecture's (docs/training.md)",
        ),
    ] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0)] = None,
    num_epochs: Annotated[int | None, typer.Option(min=1)] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(min=1, help="stop after this many steps (the epochs may end first)"),
    ] = None,
    cutoff_len: Annotated[int | None, typer.Option(min=2)] = None,
    replay_ratio: Annotated[
        float | None, typer.Option(min=0, max=0.99, help="share of replayed earlier data")
    ] = None,
    min_retention: Annotated[
        float | None, typer.Option(min=0, help="evaluation gate: least retention kept")
    ] = None,
    wait: Annotated[bool, typer.Option(help="watch the job to its end")] = True,
    route: Annotated[
        bool,
        typer.Option(
            help="once the version is ready, route the alias named like the adapter to it "
            "if that alias has no route yet (an existing route is never changed)"
        ),
    ] = True,
    output: OutputOption = Output.table,
) -> None:
    """Fine-tune a new adapter version and wait for it (Ctrl-C detaches)."""
    job_id = ""

    def prepare() -> trainer_pb2.JobSpec:
        values: dict[str, Any] = load_spec_file(spec) if spec is not None else {}
        flags = {
            "adapter": adapter,
            "dataset": str(data) if data is not None else None,
            "base_model": base_model,
            "parent_version": parent,
            "team": team,
            "lora_r": lora_r,
            "lora_alpha": lora_alpha,
            "lora_target": target_modules,
            "learning_rate": learning_rate,
            "num_epochs": num_epochs,
            "max_steps": max_steps,
            "cutoff_len": cutoff_len,
            "replay_ratio": replay_ratio,
            "min_retention": min_retention,
        }
        values.update(validate(flags))
        return build_job_spec(values)

    async def work(client: FtopsClient) -> None:
        nonlocal job_id
        job_spec = prepare()
        job = await client.submit_job(job_spec)
        job_id = job.job_id
        typer.echo(f"submitted job {job_id} ({job_spec.adapter})", err=True)
        if wait:
            job = await follow(
                client,
                job_id,
                progress=output is Output.table,
                max_steps=job_spec.hyperparameters.max_steps,
            )
        _report(job, output)
        if route and job.state == events_pb2.JOB_STATE_SUCCEEDED and job.version_id:
            typer.echo(await route_if_unrouted(client, job_spec.adapter, job.version_id), err=True)

    run(ctx, work, on_interrupt=lambda: _detach_message(job_id))


@jobs_app.command("list")
def list_jobs(
    ctx: typer.Context,
    adapter: Annotated[str, typer.Option(help="only this adapter's jobs")] = "",
    output: OutputOption = Output.table,
) -> None:
    """List training jobs."""

    async def work(client: FtopsClient) -> None:
        resp = await client.list_jobs(adapter)
        if output is Output.json:
            print_json(resp)
            return
        _print_table(
            "jobs",
            ("job", "adapter", "state", "step", "loss", "version"),
            (
                (
                    j.job_id,
                    j.spec.adapter,
                    job_state(j.state),
                    f"{j.step}/{j.total_steps}",
                    f"{j.loss:.4f}" if j.step else "-",
                    or_dash(j.version_id),
                )
                for j in resp.jobs
            ),
        )

    run(ctx, work)


@jobs_app.command("get")
def get_job(ctx: typer.Context, job_id: str, output: OutputOption = Output.table) -> None:
    """Show one job."""

    async def work(client: FtopsClient) -> None:
        job = await client.get_job(job_id)
        if output is Output.json:
            print_json(job)
        else:
            _print_job(job)

    run(ctx, work)


@jobs_app.command("cancel")
def cancel_job(ctx: typer.Context, job_id: str, output: OutputOption = Output.table) -> None:
    """Cancel a queued or running job (nothing is registered for it)."""

    async def work(client: FtopsClient) -> None:
        job = await client.cancel_job(job_id)
        if output is Output.json:
            print_json(job)
        else:
            _print_job(job)

    run(ctx, work)


@jobs_app.command("watch")
def watch_job(ctx: typer.Context, job_id: str, output: OutputOption = Output.table) -> None:
    """Follow a job to its end (exit 4 if it fails; Ctrl-C detaches)."""

    async def work(client: FtopsClient) -> None:
        job = await follow(client, job_id, progress=output is Output.table)
        _report(job, output)

    run(ctx, work, on_interrupt=lambda: _detach_message(job_id))
