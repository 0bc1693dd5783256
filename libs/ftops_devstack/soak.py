"""A long run of the whole stack under load, sampled for growth (issue 17's soak).

The chaos environment (two gateways, two inference replicas, one of every other service,
NATS with JetStream on disk, Redis, the registry on Postgres where one is reachable) under
open-loop load at half its measured capacity, with a canary release and a training job
started on a schedule. Every ``interval_s`` it samples, per process, resident memory,
open file descriptors, threads and asyncio tasks (``RuntimeService/GetRuntimeStats``;
NATS and Redis from /proc), the p99 latency of the window, every JetStream stream's bytes
and messages, Redis's key count, the registry's rows per table and the size on disk of
the artifact store, the trainer's checkpoints and the replicas' adapter caches.

``analyse`` then compares each series' first and last third and fits a slope, and judges
it against what bounds it: a process must stay flat; a stream with a limit is bounded by
that limit (named); what grows with every release or job is reported per operation with
the setting or tool that bounds it, or as unbounded when nothing does.
``bench/soak.py`` reports and plots it; ``tests/soak`` asserts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
from nats.aio.client import Client as NatsClient

from ftops.common.v1 import runtime_pb2, runtime_pb2_grpc
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_devstack import chaos
from ftops_runtime.events import STREAMS, StreamSpec

MIB = 1024 * 1024
# The registry's scheduled retention, on in the soak (off by default): what bounds the
# artifact store without an operator (ftops_registry.auto_retention).
RETENTION_ENV = {
    "FTOPS_RETENTION_KEEP_LAST": "3",
    "FTOPS_RETENTION_INTERVAL_S": "30",
    "FTOPS_ARTIFACT_GC_GRACE_S": "60",
}
# A release every 2 minutes and a training job every 5 in the full 30-minute run; shorter
# runs scale both down, to no less than these (a canary needs ~15 s to be decided).
FULL_MINUTES = 30.0
RELEASE_EVERY_S = 120.0
JOB_EVERY_S = 300.0
MIN_RELEASE_EVERY_S = 20.0
MIN_JOB_EVERY_S = 45.0

# What "flat" allows between the mean of the first and of the last third of a run: noise
# and one-off warm-up (allocator arenas, a thread pool's first use), not a trend.
RSS_RATIO, RSS_SLACK_MIB = 1.10, 16.0
FDS_SLACK = 8
THREADS_SLACK = 8
TASKS_RATIO, TASKS_SLACK = 1.25, 10.0
# p99 of the last third at most this times the first third's (plus 50 ms): drift, not the
# odd slow window (training competes for the same cores).
P99_RATIO, P99_SLACK_S = 2.0, 0.05
# What one request may add to the metrics stream (a result in a batch, JSON-free protobuf)
# and one operation (release, job) to a stream, the registry or Redis.
BYTES_PER_REQUEST = 2048
BYTES_PER_OPERATION = 256 * 1024
ROWS_PER_OPERATION = 200
KEYS_PER_OPERATION = 50


@dataclass
class Series:
    name: str
    unit: str
    # How it is judged: "flat" (a process), "p99", "limit" (a stream limit or TTL caps it),
    # "per-request" (bounded by a time window the run is shorter than), "per-operation"
    # (grows with releases and jobs: history).
    rule: str
    # The setting that bounds it, or "none" where nothing does.
    bound: str
    times_min: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, t_min: float, value: float) -> None:
        self.times_min.append(round(t_min, 3))
        self.values.append(float(value))


@dataclass
class Growth:
    name: str
    unit: str
    bound: str
    first: float  # mean of the first third
    last: float  # mean of the last third
    slope_per_min: float
    verdict: str  # "flat", "bounded", "per operation", "GROWS", "UNBOUNDED"
    ok: bool
    detail: str = ""

    def line(self) -> str:
        return (
            f"{self.first:.4g} -> {self.last:.4g} {self.unit} (slope {self.slope_per_min:+.3g}"
            f"/min): {self.verdict}; bound: {self.bound}{'; ' + self.detail if self.detail else ''}"
        )


@dataclass
class SoakRun:
    minutes: float
    rate: float
    capacity: float
    interval_s: float
    release_every_s: float
    job_every_s: float
    registry_database: str
    series: dict[str, Series] = field(default_factory=dict)
    samples: list[chaos.Sample] = field(default_factory=list)
    releases: dict[str, str] = field(default_factory=dict)  # release id -> end state
    jobs: dict[str, str] = field(default_factory=dict)  # job id -> end state
    operation_errors: list[str] = field(default_factory=list)
    growth: list[Growth] = field(default_factory=list)

    @property
    def operations(self) -> int:
        return len(self.releases) + len(self.jobs)

    def get(self, name: str, unit: str, rule: str, bound: str) -> Series:
        if name not in self.series:
            self.series[name] = Series(name, unit, rule, bound)
        return self.series[name]


# --- sampling --------------------------------------------------------------------------------


def _proc_status(pid: int) -> tuple[float, int, int]:
    """RSS (MiB), open fds and threads of a process this one started."""
    rss_kb = threads = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                rss_kb = int(value.split()[0])
            elif key == "Threads":
                threads = int(value.split()[0])
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = 0
    return rss_kb / 1024, fds, threads


def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def stream_bound(spec: StreamSpec, run_s: float) -> tuple[str, str]:
    """(rule, bound) of a stream from its spec in ftops_runtime.events.STREAMS."""
    where = f"{spec.name} in ftops_runtime.events.STREAMS"
    if spec.work_queue:
        return "limit", f"work-queue retention: acked messages removed ({where})"
    if spec.max_msgs_per_subject:
        return "limit", (
            f"max_msgs_per_subject={spec.max_msgs_per_subject}, max_age={spec.max_age_s:g} s "
            f"({where})"
        )
    if spec.max_age_s and spec.max_age_s <= run_s:
        return "limit", f"max_age={spec.max_age_s:g} s ({where})"
    if spec.max_age_s:
        return "per-request", f"max_age={spec.max_age_s:g} s ({where}), longer than the run"
    return "per-operation", f"none: no age or size limit ({where})"


class Sampler:
    def __init__(self, env: chaos.ChaosEnv, run: SoakRun, database_url: str) -> None:
        self.env = env
        self.run = run
        self.database_url = database_url
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._nc: NatsClient | None = None
        self._started = time.monotonic()
        self._last_window = self._started
        self._run_s = run.minutes * 60

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        if self._nc is not None:
            await self._nc.close()

    def _minutes(self) -> float:
        return (time.monotonic() - self._started) / 60

    async def sample(self) -> None:
        t = self._minutes()
        await self._processes(t)
        self._latency(t)
        await self._streams(t)
        await self._redis(t)
        await asyncio.to_thread(self._registry, t)
        await asyncio.to_thread(self._disk, t)

    async def _processes(self, t: float) -> None:
        run = self.run
        for name, proc in sorted(self.env.stack.processes.items()):
            if name not in self._channels:
                self._channels[name] = grpc.aio.insecure_channel(proc.address)
            stub = runtime_pb2_grpc.RuntimeServiceStub(self._channels[name])
            try:
                stats = await stub.GetRuntimeStats(runtime_pb2.GetRuntimeStatsRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                run.operation_errors.append(f"{name} runtime stats: {exc.code().name}")
                continue
            rss = run.get(f"{name} resident memory", "MiB", "flat", "none needed (flat)")
            rss.add(t, stats.rss_bytes / MIB)
            fds = run.get(f"{name} open fds", "fds", "flat", "none needed (flat)")
            fds.add(t, stats.open_fds)
            threads = run.get(f"{name} threads", "threads", "flat", "none needed (flat)")
            threads.add(t, stats.threads)
            tasks = run.get(f"{name} asyncio tasks", "tasks", "flat", "none needed (flat)")
            tasks.add(t, stats.asyncio_tasks)
        for server in (self.env.nats, self.env.redis):
            if server.proc is None:
                continue
            rss_mib, fd_count, _ = _proc_status(server.proc.pid)
            name = f"{server.name}-server"
            run.get(f"{name} resident memory", "MiB", "flat", "none needed (flat)").add(t, rss_mib)
            run.get(f"{name} open fds", "fds", "flat", "none needed (flat)").add(t, fd_count)

    def _latency(self, t: float) -> None:
        now = time.monotonic()
        window = [s for s in self.run.samples if self._last_window <= s.started < now and s.ok]
        self._last_window = now
        if window:
            ms = sorted(s.latency_s for s in window)
            p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
            self.run.get("p99 latency per window", "s", "p99", "none needed (drift)").add(t, p99)

    async def _streams(self, t: float) -> None:
        if self._nc is None or not self._nc.is_connected:
            with contextlib.suppress(Exception):
                self._nc = await nats.connect(self.env.nats.url)
        if self._nc is None:
            return
        js = self._nc.jetstream()
        specs = {spec.name: spec for spec in STREAMS}
        for info in await js.streams_info():
            name = info.config.name or ""
            spec = specs.get(name)
            if spec is None or info.state is None:
                continue
            rule, bound = stream_bound(spec, self._run_s)
            self.run.get(f"stream {name} bytes", "bytes", rule, bound).add(t, info.state.bytes)
            self.run.get(f"stream {name} messages", "msgs", rule, bound).add(t, info.state.messages)
            consumers = self.run.get(
                f"stream {name} consumers",
                "consumers",
                "flat",
                "inactive_threshold of per-replica durables",
            )
            consumers.add(t, info.state.consumer_count)

    async def _redis(self, t: float) -> None:
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.env.redis.url)
        try:
            keys = int(await client.dbsize())
        finally:
            await client.aclose()
        self.run.get(
            "redis keys",
            "keys",
            "per-operation",
            "applied-decision markers expire after 7 days (route_store dedupe_ttl_s), rate "
            "buckets once full, leases with their TTL",
        ).add(t, keys)

    def _registry(self, t: float) -> None:
        from sqlalchemy import create_engine, inspect, text

        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                tables = [n for n in inspect(conn).get_table_names() if n != "alembic_version"]
                total = 0
                for table in sorted(tables):
                    count = int(conn.execute(text(f'SELECT count(*) FROM "{table}"')).scalar_one())
                    total += count
                    self.run.get(
                        f"registry rows {table}", "rows", "per-operation", _table_bound(table)
                    ).add(t, count)
        finally:
            engine.dispose()
        self.run.get("registry rows (all tables)", "rows", "per-operation", "none: history").add(
            t, total
        )

    def _disk(self, t: float) -> None:
        workdir = self.env.stack.workdir
        self.run.get(
            "artifact store size",
            "MiB",
            "per-operation",
            "scheduled retention: the newest FTOPS_RETENTION_KEEP_LAST=3 versions per adapter "
            "(and what aliases, releases and jobs need) every FTOPS_RETENTION_INTERVAL_S=30 s, "
            "artifacts older than FTOPS_ARTIFACT_GC_GRACE_S=60 s collected (the soak's "
            "settings; off by default: ArchiveVersions and GarbageCollectArtifacts by hand)",
        ).add(t, dir_size(workdir / "artifacts") / MIB)
        self.run.get(
            "trainer checkpoints size",
            "MiB",
            "limit",
            "a job's checkpoints are deleted when it ends",
        ).add(t, dir_size(workdir / "checkpoints") / MIB)
        caches = sum(dir_size(p) for p in workdir.glob("adapter-cache*"))
        self.run.get(
            "inference adapter caches size",
            "MiB",
            "per-operation",
            "a version's files go when it is unloaded: retired by the gateway once a release "
            "replaced it (adapter.retired); a version never routed stays",
        ).add(t, caches / MIB)


def _table_bound(table: str) -> str:
    """Every registry table is history: rows are never deleted."""
    if table in ("artifacts", "artifact_files"):
        return "none: history (collected artifacts stay as rows, marked deleted)"
    if table == "versions":
        return "none: history (archived versions stay as rows)"
    return "none: history"


# --- operations ----------------------------------------------------------------------------


async def _release_loop(
    env: chaos.ChaosEnv, run: SoakRun, every_s: float, stop: asyncio.Event
) -> None:
    """A canary of the newest version that is not stable, every ``every_s`` (a release
    still running is rolled back first: ChaosEnv.start_canary)."""
    started: list[str] = []
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            break
        try:
            route = await env.route()
            if route.candidate_version_id:
                await env.admin.RollbackRelease(
                    gateway_pb2.ReleaseCommandRequest(alias=chaos.ALIAS, reason="soak: next")
                )
                route = await env.route()
            candidate = next(v for v in reversed(env.versions) if v != route.stable_version_id)
            got = await env.admin.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=chaos.ALIAS,
                    candidate_version_id=candidate,
                    strategy=events_pb2.RELEASE_STRATEGY_CANARY,
                    steps=chaos.CANARY_STEPS,
                    analysis=chaos.ANALYSIS,
                )
            )
            started.append(got.release_id)
            run.releases[got.release_id] = "running"
        except grpc.aio.AioRpcError as exc:
            run.operation_errors.append(f"release: {exc.code().name}: {exc.details()}")
    # The last one decides under the load, which runs on until this returns.
    for release_id in started:
        run.releases[release_id] = await env.release_end(release_id, timeout=90)


async def _job_loop(env: chaos.ChaosEnv, run: SoakRun, every_s: float, stop: asyncio.Event) -> None:
    """A training job of the routed adapter every ``every_s``; its version joins the ones
    released once every replica has loaded it."""
    seed = 100
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            break
        seed += 1
        try:
            job = await chaos.train(env.trainer, seed)
            run.jobs[job.job_id] = "running"
            final = await chaos.job_end(env.trainer, job.job_id, timeout=max(60.0, every_s))
            run.jobs[job.job_id] = events_pb2.JobState.Name(final.state)
            if final.state == events_pb2.JOB_STATE_SUCCEEDED:
                await chaos.loaded_everywhere(env.stack, [final.version_id], timeout=60)
                env.versions.append(final.version_id)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            run.operation_errors.append(f"job: {exc!r}"[:200])


def schedule(minutes: float) -> tuple[float, float]:
    """(release every, job every) in seconds for a run of ``minutes``."""
    scale = minutes / FULL_MINUTES
    return (
        max(MIN_RELEASE_EVERY_S, RELEASE_EVERY_S * scale),
        max(MIN_JOB_EVERY_S, JOB_EVERY_S * scale),
    )


async def soak(
    workdir: Path,
    model_dir: Path,
    minutes: float,
    *,
    rate: float = 0.0,
    interval_s: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> SoakRun:
    """Run the soak; ``interval_s`` 0 means 10 s (5 s for runs under 10 minutes)."""
    postgres = chaos.postgres_admin_url()
    env = await chaos.start_env(
        workdir, model_dir, rate, postgres_admin=postgres, extra_env=RETENTION_ENV
    )
    release_every, job_every = schedule(minutes)
    interval = interval_s or (10.0 if minutes >= 10 else 5.0)
    database_url = (
        env.postgres.url if env.postgres is not None else f"sqlite:///{workdir / 'registry.db'}"
    )
    run = SoakRun(
        minutes,
        env.rate,
        env.capacity,
        interval,
        release_every,
        job_every,
        "Postgres" if env.postgres is not None else "SQLite",
    )
    sampler = Sampler(env, run, database_url)
    stop, stop_load = asyncio.Event(), asyncio.Event()
    load = chaos.Load(env.client, env.rate)
    run.samples = load.samples
    try:
        load_task = asyncio.create_task(load.run(stop_load))
        operations = [
            asyncio.create_task(_release_loop(env, run, release_every, stop)),
            asyncio.create_task(_job_loop(env, run, job_every, stop)),
        ]
        await asyncio.sleep(min(interval, 5.0))  # the load steady before the first sample
        deadline = time.monotonic() + minutes * 60
        while time.monotonic() < deadline:
            at = time.monotonic()
            await sampler.sample()
            if progress is not None:
                progress(_progress_line(run))
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - at)))
        # No new release or job; the last ones end under the load.
        stop.set()
        await asyncio.gather(*operations)
        stop_load.set()
        await load_task
        run.growth = analyse(run)
        return run
    finally:
        stop.set()
        stop_load.set()
        await sampler.close()
        await chaos.stop_env(env)


def _progress_line(run: SoakRun) -> str:
    failed = sum(1 for s in run.samples if not s.ok)
    return (
        f"{len(run.samples)} requests ({failed} failed), {len(run.releases)} releases, "
        f"{len(run.jobs)} jobs"
    )


# --- analysis --------------------------------------------------------------------------------


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _thirds(values: list[float]) -> tuple[list[float], list[float]]:
    third = max(1, len(values) // 3)
    return values[:third], values[-third:]


def judge(series: Series, *, requests: int, operations: int) -> Growth:
    first_part, last_part = _thirds(series.values)
    first, last = statistics.fmean(first_part), statistics.fmean(last_part)
    slope = _slope(series.times_min, series.values)
    grew = series.values[-1] - series.values[0]
    name = series.name
    ok, detail = True, ""
    if series.rule == "flat":
        if name.endswith("resident memory"):
            ok = last <= first * RSS_RATIO + RSS_SLACK_MIB
            detail = f"allowed {first * RSS_RATIO + RSS_SLACK_MIB:.1f} MiB"
        elif name.endswith("asyncio tasks"):
            ok = last <= first * TASKS_RATIO + TASKS_SLACK
            detail = f"allowed {first * TASKS_RATIO + TASKS_SLACK:.0f}"
        else:  # fds, threads, consumers: counts of things that are opened once
            slack = THREADS_SLACK if name.endswith("threads") else FDS_SLACK
            ok = max(last_part) <= max(first_part) + slack
            detail = f"allowed a peak of {max(first_part) + slack:.0f}"
        verdict = "flat" if ok else "GROWS"
        if ok and last > first * 1.05 + (4.0 if series.unit == "MiB" else 2.0):
            # Within tolerance, but a trend a longer run must show to level off.
            verdict = f"rising within tolerance ({last - first:+.3g} {series.unit})"
    elif series.rule == "p99":
        first_p99, last_p99 = statistics.median(first_part), statistics.median(last_part)
        ok = last_p99 <= first_p99 * P99_RATIO + P99_SLACK_S
        first, last = first_p99, last_p99
        verdict = "no drift" if ok else "DRIFTS"
        detail = f"medians of the windows' p99; allowed {first_p99 * P99_RATIO + P99_SLACK_S:.3f} s"
    elif series.rule == "limit":
        verdict = "bounded"
        if series.unit == "bytes":
            ok = grew <= BYTES_PER_OPERATION * max(1, operations)
    elif series.rule == "per-request":
        verdict = "bounded"
        if series.unit == "bytes" and requests:
            per = max(0.0, grew) / requests
            ok = per <= BYTES_PER_REQUEST or grew <= BYTES_PER_OPERATION * max(1, operations)
            detail = (
                f"{per:.0f} B per request; plateau at this rate ~"
                f"{slope * _max_age_min(series.bound) / MIB:.1f} MiB"
            )
    else:  # per-operation
        per_op = max(0.0, grew) / max(1, operations)
        unbounded = series.bound.startswith("none")
        if max(series.values) == min(series.values):
            verdict = "unchanged"
        elif unbounded:
            verdict = "UNBOUNDED (grows per operation)"
        else:
            verdict = "per operation"
        cap = {
            "bytes": BYTES_PER_OPERATION,
            "rows": ROWS_PER_OPERATION,
            "keys": KEYS_PER_OPERATION,
            "MiB": BYTES_PER_OPERATION / MIB * 16,
        }.get(series.unit, float("inf"))
        # Growth per release or job is history (what the issue asks be bounded by a
        # setting): reported as UNBOUNDED where nothing bounds it. Growth beyond a
        # generous cap per operation means something grows with time or requests.
        ok = per_op <= cap
        detail = f"{per_op:.4g} {series.unit} per operation ({operations} operations)"
    return Growth(name, series.unit, series.bound, first, last, slope, verdict, ok, detail)


def _max_age_min(bound: str) -> float:
    with contextlib.suppress(ValueError, IndexError):
        return float(bound.split("max_age=")[1].split(" s")[0]) / 60
    return 0.0


def analyse(run: SoakRun) -> list[Growth]:
    requests = len(run.samples)
    return [
        judge(series, requests=requests, operations=run.operations)
        for series in run.series.values()
        if len(series.values) >= 3
    ]
