"""Faults injected into a running stack, one at a time, and what each cost (issue 17).

``ChaosEnv`` runs the whole platform as processes (two gateways, two inference replicas,
one of every other service) on a NATS with JetStream on disk and a Redis with an
append-only file, the way production runs them, plus open-loop client load balanced over
both gateways. Each ``fault_*`` coroutine injects one fault, waits for the platform to
recover, leaves the stack whole again (the killed process restarted) and returns a
``FaultResult``: failed requests, events published vs applied (matched by event id), the
release's or job's end state and the time to recover. ``tests/chaos`` asserts on these;
``bench/chaos.py`` reports them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import nats.errors
from grpc_health.v1 import health_pb2
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_devstack.lifetime import die_with_parent
from ftops_devstack.proxy import TcpProxy
from ftops_devstack.servers import (
    ManagedServer,
    free_port,
    port_open,
    redis_binary,
    start_nats,
    wait_port,
)
from ftops_devstack.stack import Stack, health_status
from ftops_runtime.events import (
    ADAPTER_LOADED,
    ADAPTER_READY,
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    ROUTE_CHANGED,
)

ALIAS = "chaos-bot"
PROMPTS = ["Product LZ-59 costs", "The capital of Norvia is", "Order 7 ships to", "Hello"]
SAMPLING = common_pb2.SamplingParams(max_tokens=6, temperature=0)
# A canary short enough for a test: three steps, each decided on 10 requests per arm.
CANARY_STEPS = [10, 50, 100]
ANALYSIS = events_pb2.AnalysisSettings(min_requests=10, min_stable_requests=10, auto=True)
# Open-loop load: half the measured capacity, at most this (loaded, not overloaded).
LOAD_SHARE = 0.5
MAX_RATE = 20.0
# The target for every dependency fault: serving as before within this after it returns.
RECOVERY_TARGET_S = 10.0
STACK_ENV = {
    "FTOPS_SHUTDOWN_GRACE_S": "2",
    # A killed trainer's job is redelivered after this (its heartbeats stop).
    "FTOPS_JOB_ACK_WAIT_S": "3",
    "FTOPS_PROGRESS_INTERVAL_S": "0.2",
    "FTOPS_WATCH_POLL_S": "0.2",
    "FTOPS_HEALTH_INTERVAL_S": "0.5",
}


# --- servers that can be killed and brought back as they were --------------------------


def start_durable_redis() -> ManagedServer:
    """Redis with its append-only file fsynced on every write, as production runs it: a
    killed Redis comes back with its routing tables."""
    import tempfile

    port = free_port()
    workdir = tempfile.TemporaryDirectory(prefix="ftops-chaos-redis-")
    proc = subprocess.Popen(
        [
            redis_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            workdir.name,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(),
    )
    try:
        wait_port("127.0.0.1", port, proc=proc)
    except BaseException:
        proc.kill()
        workdir.cleanup()
        raise
    return ManagedServer("redis", f"redis://127.0.0.1:{port}/0", "127.0.0.1", port, proc, workdir)


def kill_server(server: ManagedServer) -> None:
    """SIGKILL: no shutdown, no flush beyond what the server already made durable."""
    assert server.proc is not None, "only a server this process started can be killed"
    server.proc.kill()
    server.proc.wait()


def revive_server(server: ManagedServer) -> None:
    """Start a killed server again with the same command line: same port, same store
    directory (JetStream's streams, Redis's append-only file)."""
    assert server.proc is not None
    assert server.proc.poll() is not None, "the server is still running"
    args = server.proc.args
    server.proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(),
    )
    wait_port(server.host, server.port, proc=server.proc)


def postgres_admin_url() -> str:
    """A Postgres to put the registry on: ``FTOPS_TEST_POSTGRES_URL`` (as the tests'
    fixtures), else one on 127.0.0.1:5432; "" when there is none."""
    url = os.environ.get("FTOPS_TEST_POSTGRES_URL", "")
    if url:
        return url
    if port_open("127.0.0.1", 5432):
        return "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    return ""


@dataclass
class ThrowawayDatabase:
    """A fresh database on a shared Postgres, reached through a proxy that can cut it
    off (``proxy.cut()``: Postgres stopped, as its clients see it). ``url`` is the
    proxied one the registry uses; ``drop()`` removes the database."""

    admin_url: str
    name: str
    proxy: TcpProxy

    @classmethod
    def create(cls, admin_url: str) -> ThrowawayDatabase:
        import uuid

        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        name = f"ftops_chaos_{uuid.uuid4().hex[:10]}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        parsed = make_url(admin_url)
        proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
        proxy.start()
        return cls(admin_url, name, proxy)

    @property
    def url(self) -> str:
        from sqlalchemy.engine import make_url

        proxied = make_url(self.admin_url).set(
            host=self.proxy.host, port=self.proxy.port, database=self.name
        )
        return proxied.render_as_string(hide_password=False)

    def drop(self) -> None:
        from sqlalchemy import create_engine, text

        self.proxy.stop()
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        finally:
            admin.dispose()


# --- client load ---------------------------------------------------------------------------


def balanced_channel(addresses: list[str]) -> grpc.aio.Channel:
    """What production clients use: round robin over the gateways, client-side health
    checks (a NOT_SERVING gateway gets no calls) and retries of UNAVAILABLE."""
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                "name": [{"service": "ftops.gateway.v1.GatewayService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
    return grpc.aio.insecure_channel(
        "ipv4:" + ",".join(addresses),
        options=[("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)],
    )


@dataclass
class Sample:
    started: float  # time.monotonic()
    ok: bool
    latency_s: float = 0.0
    version_id: str = ""
    error: str = ""


@dataclass
class Load:
    """Open-loop traffic at ``rate`` requests/s, unary and streaming alternating."""

    gateway: gateway_pb2_grpc.GatewayServiceStub
    rate: float
    samples: list[Sample] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _one(self, i: int) -> None:
        request = gateway_pb2.GenerateRequest(
            model=ALIAS, prompt=PROMPTS[i % len(PROMPTS)], sampling=SAMPLING, user=f"u{i % 50}"
        )
        started = time.monotonic()
        try:
            if i % 2:
                version = ""
                async for chunk in self.gateway.GenerateStream(request, timeout=30):
                    version = version or chunk.version_id
            else:
                version = (await self.gateway.Generate(request, timeout=30)).version_id
            self.samples.append(
                Sample(started, True, version_id=version, latency_s=time.monotonic() - started)
            )
        except grpc.aio.AioRpcError as exc:
            self.samples.append(Sample(started, False, error=f"{exc.code().name}: {exc.details()}"))

    async def run(self, stop: asyncio.Event) -> None:
        interval, next_at, i = 1.0 / self.rate, time.monotonic(), 0
        while not stop.is_set():
            task = asyncio.create_task(self._one(i))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            i += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if self._tasks:
            await asyncio.wait(self._tasks)

    def since(self, t0: float) -> list[Sample]:
        return [s for s in self.samples if s.started >= t0]


async def capacity(gateway: gateway_pb2_grpc.GatewayServiceStub, seconds: float = 4.0) -> float:
    """Requests/s the stack sustains closed-loop with 4 concurrent clients."""
    done = 0
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            request = gateway_pb2.GenerateRequest(model=ALIAS, prompt=PROMPTS[i], sampling=SAMPLING)
            await gateway.Generate(request, timeout=30)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(4)))
    return done / (time.monotonic() - started)


# --- events published vs applied ----------------------------------------------------------


@dataclass
class Ledger:
    """One release's events, matched by id: the monitor's decisions, the gateway's
    applied changes (``route.changed``, each naming the decision or command it applied)
    and the registry's recorded history."""

    decisions: list[str] = field(default_factory=list)  # release.promote/rollback ids
    route_changes: list[str] = field(default_factory=list)  # route.changed meta ids
    applied: list[str] = field(default_factory=list)  # change.event_id per route.changed
    recorded: list[str] = field(default_factory=list)  # the registry's history ids

    @property
    def published(self) -> int:
        return len(set(self.applied))

    @property
    def lost(self) -> list[str]:
        """Changes the gateway applied and published that the registry never recorded."""
        return sorted(set(self.applied) - set(self.recorded))

    @property
    def duplicated(self) -> list[str]:
        """Any id seen twice where it must be once: a stored route.changed, a decision
        applied twice by the gateway, a decision recorded twice by the registry."""
        twice = Counter(self.route_changes) + Counter(self.applied) + Counter(self.recorded)
        once = Counter(set(self.route_changes)) + Counter(set(self.applied))
        once += Counter(set(self.recorded))
        return sorted((twice - once).keys())

    @property
    def decisions_unapplied(self) -> list[str]:
        """Monitor decisions the gateway never applied (a later decision may supersede
        one legitimately, e.g. a repeat of a step already taken; reported, not judged)."""
        return sorted(set(self.decisions) - set(self.applied))


async def _read_subject(nc: NatsClient, subject: str) -> list[Msg]:
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
    messages = []
    try:
        while True:
            try:
                messages.append(await sub.next_msg(timeout=1.0))
            except nats.errors.TimeoutError:
                return messages
    finally:
        await sub.unsubscribe()


async def ledger(env: ChaosEnv, release_id: str) -> Ledger:
    book = Ledger()
    nc = await nats.connect(env.nats.url)
    try:
        for subject, kind in (
            (RELEASE_PROMOTE, events_pb2.ReleasePromote),
            (RELEASE_ROLLBACK, events_pb2.ReleaseRollback),
        ):
            for msg in await _read_subject(nc, subject):
                decision = kind.FromString(msg.data)
                if decision.release_id == release_id:
                    book.decisions.append(decision.meta.event_id)
        for msg in await _read_subject(nc, ROUTE_CHANGED):
            changed = events_pb2.RouteChanged.FromString(msg.data)
            if changed.release.release_id == release_id and changed.release.change.event_id:
                book.route_changes.append(changed.meta.event_id)
                book.applied.append(changed.release.change.event_id)
    finally:
        await nc.close()
    release = await env.admin.GetRelease(gateway_pb2.GetReleaseRequest(release_id=release_id))
    book.recorded = [d.event_id for d in release.history]
    return book


# --- the environment -------------------------------------------------------------------------


@dataclass
class FaultResult:
    fault: str
    requests: int = 0
    failed_requests: int = 0
    failures: list[str] = field(default_factory=list)  # the first few errors
    events_published: int = 0
    events_applied: int = 0
    events_lost: list[str] = field(default_factory=list)
    events_duplicated: list[str] = field(default_factory=list)
    release_state: str = ""  # "" when no release ran
    release_expected: str = ""
    job_outcome: str = ""
    job_state: str = ""
    job_attempts: int = 0
    job_resumed_from_step: int = 0
    versions_registered: int = 0
    recovery_s: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)
    # Of the requests that succeeded during the fault (the benchmark's table).
    latencies_s: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "failed requests": self.failed_requests,
            "events published/applied": f"{self.events_published}/{self.events_applied}",
            "events lost": len(self.events_lost),
            "events duplicated": len(self.events_duplicated),
            "release": f"{self.release_state} (expected {self.release_expected})"
            if self.release_expected
            else "-",
            "job": self.job_outcome or "-",
            "recovery (s)": round(self.recovery_s, 2),
            **self.notes,
        }


@dataclass
class ChaosEnv:
    stack: Stack
    nats: ManagedServer
    redis: ManagedServer
    admin: gateway_pb2_grpc.GatewayServiceStub
    client: gateway_pb2_grpc.GatewayServiceStub
    trainer: trainer_pb2_grpc.TrainerServiceStub
    registry: registry_pb2_grpc.RegistryServiceStub
    versions: list[str]
    rate: float
    capacity: float
    # The services reach NATS through this proxy (cut: NATS unreachable, still running).
    nats_proxy: TcpProxy | None = None
    # The registry's Postgres and the proxy in front of it; None: the registry on SQLite.
    postgres: ThrowawayDatabase | None = None
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def route(self) -> gateway_pb2.Route:
        got: gateway_pb2.Route = await self.admin.GetRoute(gateway_pb2.GetRouteRequest(alias=ALIAS))
        return got

    async def start_canary(self) -> gateway_pb2.Route:
        """A canary of whichever trained version is not stable now (a release an earlier
        fault left running is rolled back first, so that one fault never fails the next)."""
        if (await self.route()).candidate_version_id:
            await self.admin.RollbackRelease(
                gateway_pb2.ReleaseCommandRequest(alias=ALIAS, reason="chaos: clean slate")
            )
        stable = (await self.route()).stable_version_id
        candidate = next(v for v in self.versions if v != stable)
        started: gateway_pb2.Route = await self.admin.StartRelease(
            gateway_pb2.StartReleaseRequest(
                alias=ALIAS,
                candidate_version_id=candidate,
                strategy=events_pb2.RELEASE_STRATEGY_CANARY,
                steps=CANARY_STEPS,
                analysis=ANALYSIS,
            )
        )
        return started

    async def release_end(self, release_id: str, timeout: float = 90.0) -> str:
        """The release's final state ("promoted", "rolled_back", ...), or "running" when it
        did not end within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with_retry = await _quietly(
                self.admin.GetRelease(gateway_pb2.GetReleaseRequest(release_id=release_id))
            )
            state = with_retry.state if with_retry is not None else ""
            if state and state not in ("running", "paused"):
                return str(state)
            if time.monotonic() > deadline:
                return state or "unknown"
            await asyncio.sleep(0.25)

    async def serving(self, names: list[str] | None = None) -> bool:
        for name in names or list(self.stack.processes):
            status = await health_status(self.stack.address(name))
            if status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()


async def _quietly(call: Awaitable[gateway_pb2.Release]) -> gateway_pb2.Release | None:
    try:
        return await call
    except grpc.aio.AioRpcError:
        return None


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> float:
    """Seconds until ``check`` holds; TimeoutError naming ``what`` otherwise."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def train(
    trainer: trainer_pb2_grpc.TrainerServiceStub,
    seed: int,
    adapter: str = ALIAS,
    hyperparameters: trainer_pb2.Hyperparameters | None = None,
) -> trainer_pb2.Job:
    """Submit a small job on the tiny model; its job record once submitted."""
    rows = [
        {"prompt": f"Ticket {seed}-{i} is about", "completion": f" topic {seed * 7 + i}."}
        for i in range(8)
    ]
    spec = trainer_pb2.JobSpec(
        adapter=adapter,
        team="chaos",
        base_model="tiny-llama",
        dataset_jsonl="\n".join(json.dumps(r) for r in rows).encode(),
        hyperparameters=hyperparameters or trainer_pb2.Hyperparameters(max_steps=2, seed=seed),
        replay=trainer_pb2.ReplayConfig(ratio=0),
        gate=trainer_pb2.GateConfig(disabled=True),
    )
    job: trainer_pb2.Job = await trainer.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    return job


async def job_end(
    trainer: trainer_pb2_grpc.TrainerServiceStub, job_id: str, timeout: float = 120.0
) -> trainer_pb2.Job:
    """Polls (a watch would end with the trainer it is connected to)."""
    deadline = time.monotonic() + timeout
    done = (
        events_pb2.JOB_STATE_SUCCEEDED,
        events_pb2.JOB_STATE_FAILED,
        events_pb2.JOB_STATE_CANCELLED,
    )
    while True:
        try:
            job: trainer_pb2.Job = await trainer.GetJob(
                trainer_pb2.GetJobRequest(job_id=job_id), timeout=5
            )
            if job.state in done or time.monotonic() > deadline:
                return job
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.25)


async def loaded_everywhere(stack: Stack, versions: list[str], timeout: float = 120) -> None:
    """Until every inference replica of ``stack`` has ``versions`` loaded."""
    from ftops.inference.v1 import inference_pb2, inference_pb2_grpc

    deadline = time.monotonic() + timeout
    for address in stack.addresses("inference"):
        async with grpc.aio.insecure_channel(address) as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            while True:
                listed = await stub.ListAdapters(inference_pb2.ListAdaptersRequest())
                loaded = {
                    a.version_id
                    for a in listed.adapters
                    if a.state == inference_pb2.ADAPTER_STATE_LOADED
                }
                if set(versions) <= loaded:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{address} has not loaded {set(versions) - loaded}")
                await asyncio.sleep(0.2)


async def start_env(
    workdir: Path,
    model_dir: Path,
    rate: float = 0.0,
    *,
    postgres_admin: str = "",
    extra_env: dict[str, str] | None = None,
) -> ChaosEnv:
    """Servers, the stack, two trained versions loaded on both replicas and routed, and
    the load rate (``rate`` or half the measured capacity, at most ``MAX_RATE``). The
    services reach NATS through a proxy (``nats_proxy``); with ``postgres_admin`` (a
    Postgres admin URL, see ``postgres_admin_url``) the registry runs on a throwaway
    database there, also behind a proxy (``postgres``), else on SQLite. The caller stops
    everything with ``stop_env`` (in a finally block)."""
    nats_server = start_nats()
    redis = start_durable_redis()
    nats_proxy = TcpProxy(nats_server.host, nats_server.port)
    nats_proxy.start()
    env_vars = {**STACK_ENV, "FTOPS_CHECKPOINT_DIR": str(workdir / "checkpoints")}
    postgres: ThrowawayDatabase | None = None
    if postgres_admin:
        postgres = ThrowawayDatabase.create(postgres_admin)
        env_vars["FTOPS_DATABASE_URL"] = postgres.url
    env_vars.update(extra_env or {})
    stack = Stack(
        workdir,
        nats_proxy.url("nats"),
        redis.url,
        model_dir,
        extra_env=env_vars,
        replicas={"gateway": 2, "inference": 2},
    )
    env: ChaosEnv | None = None
    try:
        stack.start()
        await stack.wait_serving(timeout=240)
        channels = [
            grpc.aio.insecure_channel(stack.address("gateway")),
            grpc.aio.insecure_channel(stack.address("trainer")),
            grpc.aio.insecure_channel(stack.address("registry")),
            balanced_channel(stack.addresses("gateway")),
        ]
        admin_ch, trainer_ch, registry_ch, client_ch = channels
        trainer = trainer_pb2_grpc.TrainerServiceStub(trainer_ch)
        versions = []
        for seed in (1, 2):
            job = await job_end(trainer, (await train(trainer, seed)).job_id)
            if job.state != events_pb2.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"training job {job.job_id} ended {job.state}: {job.error}")
            versions.append(job.version_id)
        await loaded_everywhere(stack, versions)
        admin = gateway_pb2_grpc.GatewayServiceStub(admin_ch)
        await admin.SetRoute(gateway_pb2.SetRouteRequest(alias=ALIAS, version_id=versions[0]))
        client = gateway_pb2_grpc.GatewayServiceStub(client_ch)
        measured = await capacity(client)
        env = ChaosEnv(
            stack,
            nats_server,
            redis,
            admin,
            client,
            trainer,
            registry_pb2_grpc.RegistryServiceStub(registry_ch),
            versions,
            rate or max(2.0, min(MAX_RATE, round(LOAD_SHARE * measured, 1))),
            measured,
            nats_proxy,
            postgres,
            channels,
        )
        return env
    except BaseException:
        stack.stop()
        redis.stop()
        nats_proxy.stop()
        nats_server.stop()
        if postgres is not None:
            postgres.drop()
        raise


async def stop_env(env: ChaosEnv) -> None:
    try:
        await env.close()
    finally:
        env.stack.stop()
        env.redis.stop()
        if env.nats_proxy is not None:
            env.nats_proxy.stop()
        env.nats.stop()
        if env.postgres is not None:
            env.postgres.drop()


class Loaded:
    """``async with Loaded(env) as load``: open-loop traffic for the block's duration,
    drained (every request answered or failed) on exit."""

    def __init__(self, env: ChaosEnv) -> None:
        self.load = Load(env.client, env.rate)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Load:
        self._task = asyncio.create_task(self.load.run(self._stop))
        await asyncio.sleep(2)  # steady before the fault
        return self.load

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


def _count(result: FaultResult, samples: list[Sample]) -> None:
    failed = [s for s in samples if not s.ok]
    result.requests = len(samples)
    result.failed_requests = len(failed)
    result.failures = list(dict.fromkeys(s.error for s in failed))[:5]
    result.latencies_s = [s.latency_s for s in samples if s.ok]


async def _events(result: FaultResult, env: ChaosEnv, release_id: str) -> None:
    book = await ledger(env, release_id)
    result.events_published = book.published
    result.events_applied = len(set(book.recorded) & set(book.applied))
    result.events_lost = book.lost
    result.events_duplicated = book.duplicated
    if book.decisions_unapplied:
        result.notes["monitor decisions not applied"] = str(len(book.decisions_unapplied))


def _kill(env: ChaosEnv, name: str) -> None:
    proc = env.stack.processes[name].proc
    proc.kill()
    proc.wait()


# --- the faults ------------------------------------------------------------------------------


async def _canary_with_process_killed(env: ChaosEnv, fault: str, name: str) -> FaultResult:
    """A canary runs under load; ``name`` is SIGKILLed at its first step and restarted."""
    result = FaultResult(fault, release_expected="promoted")
    async with Loaded(env) as load:
        t0 = time.monotonic()
        route = await env.start_canary()
        await asyncio.sleep(1.0)
        _kill(env, name)
        await asyncio.sleep(1.0)
        revived = time.monotonic()
        await env.stack.restart(name)
        result.recovery_s = time.monotonic() - revived
        result.release_state = await env.release_end(route.release_id)
        await asyncio.sleep(1.0)
    _count(result, load.since(t0))
    await _events(result, env, route.release_id)
    final = await env.route()
    if result.release_state == "promoted" and final.stable_version_id != route.candidate_version_id:
        result.release_state = f"promoted but stable is {final.stable_version_id}"
    return result


async def fault_inference_killed(env: ChaosEnv) -> FaultResult:
    """An inference replica SIGKILLed under load mid-canary (the other replica serves)."""
    return await _canary_with_process_killed(env, "inference replica SIGKILLed", "inference-2")


async def fault_gateway_killed(env: ChaosEnv) -> FaultResult:
    """A gateway SIGKILLed under load mid-canary (clients balance over both)."""
    return await _canary_with_process_killed(env, "gateway SIGKILLed", "gateway-2")


async def fault_monitor_killed(env: ChaosEnv) -> FaultResult:
    """The monitor SIGKILLed at the canary's first step: nothing decides until it is back;
    the restarted monitor rebuilds the release from route.changed and finishes it.
    Recovery: from the monitor SERVING again to the release's end."""
    result = FaultResult("monitor SIGKILLed mid-canary", release_expected="promoted")
    async with Loaded(env) as load:
        t0 = time.monotonic()
        route = await env.start_canary()
        await asyncio.sleep(0.5)
        _kill(env, "monitor")
        await asyncio.sleep(3.0)
        held = await env.route()
        result.notes["weight while the monitor was down"] = str(held.candidate_weight)
        await env.stack.restart("monitor")
        back = time.monotonic()
        result.release_state = await env.release_end(route.release_id)
        result.recovery_s = time.monotonic() - back
    _count(result, load.since(t0))
    await _events(result, env, route.release_id)
    return result


async def _direct_requests(env: ChaosEnv, per_gateway: int) -> str:
    ok = sent = 0
    for address in env.stack.addresses("gateway"):
        async with grpc.aio.insecure_channel(address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            for i in range(per_gateway):
                sent += 1
                request = gateway_pb2.GenerateRequest(
                    model=ALIAS, prompt=PROMPTS[i % len(PROMPTS)], sampling=SAMPLING
                )
                try:
                    await stub.Generate(request, timeout=10)
                    ok += 1
                except grpc.aio.AioRpcError:
                    pass
    return f"{ok}/{sent}"


async def fault_redis_down(env: ChaosEnv, down_s: float = 10.0) -> FaultResult:
    """Redis SIGKILLed for ``down_s``: gateways route by their last table meanwhile.
    Recovery: from Redis back to a route change accepted again."""
    result = FaultResult(f"Redis killed for {down_s:.0f} s")
    stable = (await env.route()).stable_version_id
    async with Loaded(env) as load:
        t0 = time.monotonic()
        kill_server(env.redis)
        await asyncio.sleep(min(2.0, down_s / 2))
        # Straight to each gateway, past the balancer's health checks: do they route?
        direct = await _direct_requests(env, per_gateway=5)
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - t0)))
        revive_server(env.redis)

        async def route_change_accepted() -> bool:
            try:
                await env.admin.SetRoute(
                    gateway_pb2.SetRouteRequest(alias=ALIAS, version_id=stable), timeout=2
                )
            except grpc.aio.AioRpcError:
                return False
            return await env.serving(env.stack.names("gateway"))

        result.recovery_s = await until(route_change_accepted, "route change after Redis", 60)
        await asyncio.sleep(1.0)
    samples = load.since(t0)
    _count(result, samples)
    result.notes["direct requests during the outage (ok/sent)"] = direct
    off_table = [s for s in samples if s.ok and s.version_id != stable]
    result.notes["answered by another version than the last table's"] = str(len(off_table))
    return result


async def fault_nats_restarted(env: ChaosEnv, down_s: float = 3.0) -> FaultResult:
    """NATS SIGKILLed at a canary's first step and restarted on the same JetStream store
    after ``down_s``. Recovery: from NATS back to every service SERVING."""
    result = FaultResult("NATS killed and restarted mid-release", release_expected="promoted")
    async with Loaded(env) as load:
        t0 = time.monotonic()
        route = await env.start_canary()
        await asyncio.sleep(1.0)
        kill_server(env.nats)
        await asyncio.sleep(down_s)
        revive_server(env.nats)
        result.recovery_s = await until(env.serving, "every service SERVING after NATS", 60)
        # The monitor holds the step while the outage's transport failures are above 5% of
        # its results (not the candidate's fault), so the canary ends later than usual.
        result.release_state = await env.release_end(route.release_id, timeout=150)
    _count(result, load.since(t0))
    await _events(result, env, route.release_id)
    return result


async def fault_trainer_killed(env: ChaosEnv) -> FaultResult:
    """The trainer SIGKILLed mid-job: the restarted one resumes from the checkpoint; the
    adapter gets exactly one new version. Recovery: from the trainer SERVING again to the
    job's end."""
    result = FaultResult("trainer SIGKILLed mid-job")
    adapter = "chaos-trainee"
    job = await train(
        env.trainer,
        seed=7,
        adapter=adapter,
        # 2 steps an epoch (8 records, batch 4): long enough to be killed mid-job.
        hyperparameters=trainer_pb2.Hyperparameters(
            num_epochs=40, batch_size=4, checkpoint_every=5, seed=7
        ),
    )

    async def past_a_checkpoint() -> bool:
        got = await env.trainer.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))
        return bool(got.step >= 12)

    await until(past_a_checkpoint, "job past step 12", 120)
    _kill(env, "trainer")
    await env.stack.restart("trainer")
    back = time.monotonic()
    final = await job_end(env.trainer, job.job_id)
    result.recovery_s = time.monotonic() - back
    listed = await env.registry.ListVersions(registry_pb2.ListVersionsRequest(adapter=adapter))
    result.job_state = events_pb2.JobState.Name(final.state)
    result.job_attempts = final.attempts
    result.job_resumed_from_step = final.resumed_from_step
    result.versions_registered = len(listed.versions)
    result.job_outcome = (
        f"{events_pb2.JobState.Name(final.state)}, attempts {final.attempts}, resumed from step "
        f"{final.resumed_from_step}, {final.step}/{final.total_steps} steps, "
        f"{len(listed.versions)} version(s) of {adapter}"
    )
    result.notes["job id"] = final.job_id
    result.notes["versions"] = ",".join(v.version_id for v in listed.versions)
    return result


async def fault_registry_killed(env: ChaosEnv) -> FaultResult:
    """The registry SIGKILLed under load while a job trains and registers: serving goes on,
    the job registers exactly one version once the registry is back."""
    result = FaultResult("registry SIGKILLed")
    adapter = "chaos-registrant"
    async with Loaded(env) as load:
        t0 = time.monotonic()
        job = await train(env.trainer, seed=11, adapter=adapter)
        _kill(env, "registry")
        await asyncio.sleep(2.0)
        revived = time.monotonic()
        await env.stack.restart("registry")
        result.recovery_s = time.monotonic() - revived
        final = await job_end(env.trainer, job.job_id)
    _count(result, load.since(t0))
    listed = await env.registry.ListVersions(registry_pb2.ListVersionsRequest(adapter=adapter))
    result.job_state = events_pb2.JobState.Name(final.state)
    result.job_attempts = final.attempts
    result.versions_registered = len(listed.versions)
    result.job_outcome = (
        f"{events_pb2.JobState.Name(final.state)}, attempts {final.attempts}, "
        f"{len(listed.versions)} version(s) of {adapter}"
    )
    return result


async def adapter_events(env: ChaosEnv, version_id: str) -> tuple[list[str], list[str]]:
    """The ``adapter.ready`` event ids stored for ``version_id`` (one per publish the
    stream kept) and the replicas that announced ``adapter.loaded`` for it."""
    ready: list[str] = []
    loaded: list[str] = []
    nc = await nats.connect(env.nats.url)
    try:
        for msg in await _read_subject(nc, ADAPTER_READY):
            event = events_pb2.AdapterReady.FromString(msg.data)
            if event.version_id == version_id:
                ready.append(event.meta.event_id)
        for msg in await _read_subject(nc, ADAPTER_LOADED):
            done = events_pb2.AdapterLoaded.FromString(msg.data)
            if done.version_id == version_id:
                loaded.append(done.replica_id)
    finally:
        await nc.close()
    return ready, loaded


async def _job_and_versions(
    result: FaultResult, env: ChaosEnv, final: trainer_pb2.Job, adapter: str
) -> list[registry_pb2.Version]:
    listed = await env.registry.ListVersions(registry_pb2.ListVersionsRequest(adapter=adapter))
    versions = list(listed.versions)
    result.job_state = events_pb2.JobState.Name(final.state)
    result.job_attempts = final.attempts
    result.job_resumed_from_step = final.resumed_from_step
    result.versions_registered = len(versions)
    result.job_outcome = (
        f"{result.job_state}, attempts {final.attempts}, {final.step}/{final.total_steps} "
        f"steps, {len(versions)} version(s) of {adapter}"
    )
    if final.error:
        result.notes["job error"] = final.error
    return versions


async def _version_events(result: FaultResult, env: ChaosEnv, version_id: str) -> None:
    """adapter.ready published once for the version, applied (loaded) by every replica."""
    ready, loaded = await adapter_events(env, version_id)
    replicas = sorted(set(loaded))
    result.events_published = len(set(ready))
    result.events_applied = (
        len(set(ready)) if len(replicas) == len(env.stack.names("inference")) else 0
    )
    result.events_duplicated = sorted(k for k, n in Counter(ready).items() if n > 1)
    result.notes["replicas that loaded the version"] = ",".join(replicas) or "none"


async def fault_postgres_down(env: ChaosEnv, down_s: float = 30.0) -> FaultResult:
    """Postgres (the registry's database) unreachable for ``down_s`` while a job finishes
    and registers its version: cut ten steps before the job's end, so its uploads and
    ``RegisterVersion`` meet the outage. Serving goes on (loaded versions need
    no registry); the job ends with exactly one version, loaded on every replica.
    Recovery: from Postgres back to the registry SERVING."""
    assert env.postgres is not None, "the registry runs on SQLite: start_env(postgres_admin=)"
    proxy = env.postgres.proxy
    result = FaultResult(f"Postgres unreachable for {down_s:.0f} s mid-registration")
    adapter = "chaos-pg"
    async with Loaded(env) as load:
        t0 = time.monotonic()
        job = await train(
            env.trainer,
            seed=13,
            adapter=adapter,
            hyperparameters=trainer_pb2.Hyperparameters(max_steps=60, checkpoint_every=10, seed=13),
        )

        async def near_the_end() -> bool:
            # Ten steps before the end (1-3 s on the tiny model): the rest of the training
            # needs no registry, its uploads and registration then meet the outage.
            try:
                got = await env.trainer.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))
            except grpc.aio.AioRpcError:
                return False
            return bool(got.total_steps and got.step >= got.total_steps - 10)

        await until(near_the_end, "job ten steps before its end", 120)
        cut_wall = time.time()
        await asyncio.to_thread(proxy.cut)
        cut_at = time.monotonic()
        await asyncio.sleep(min(3.0, down_s / 2))
        registry_health = await health_status(env.stack.address("registry"))
        serving_status = health_pb2.HealthCheckResponse.ServingStatus
        result.notes["registry during the outage"] = serving_status.Name(registry_health)
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - cut_at)))
        await asyncio.to_thread(proxy.restore)
        back = time.monotonic()
        result.recovery_s = await until(
            lambda: env.serving(["registry"]), "registry SERVING after Postgres", 60
        )
        final = await job_end(env.trainer, job.job_id, timeout=180)
        result.notes["job ended after Postgres returned (s)"] = f"{time.monotonic() - back:.1f}"
        if final.state == events_pb2.JOB_STATE_SUCCEEDED:
            await loaded_everywhere(env.stack, [final.version_id], timeout=60)
        await asyncio.sleep(1.0)
    _count(result, load.since(t0))
    versions = await _job_and_versions(result, env, final, adapter)
    if versions:
        registered = versions[-1].created_at.ToSeconds()
        result.notes["version registered"] = (
            "after the outage" if registered >= cut_wall + down_s * 0.5 else "before the cut"
        )
    if final.version_id:
        await _version_events(result, env, final.version_id)
    return result


async def fault_nats_unreachable(env: ChaosEnv, down_s: float = 30.0) -> FaultResult:
    """NATS unreachable for ``down_s`` (connections reset, new ones refused; the server
    and its streams stay as they were) while a canary runs and a job trains. The canary
    must still be promoted with every decision recorded once, the job end with one
    version. Recovery: from NATS reachable again to every service SERVING."""
    assert env.nats_proxy is not None
    proxy = env.nats_proxy
    result = FaultResult(
        f"NATS unreachable for {down_s:.0f} s mid-release", release_expected="promoted"
    )
    adapter = "chaos-partitioned"
    async with Loaded(env) as load:
        t0 = time.monotonic()
        route = await env.start_canary()
        job = await train(
            env.trainer,
            seed=17,
            adapter=adapter,
            hyperparameters=trainer_pb2.Hyperparameters(
                num_epochs=40, batch_size=4, checkpoint_every=5, seed=17
            ),
        )
        await asyncio.sleep(1.0)
        await asyncio.to_thread(proxy.cut)
        cut_at = time.monotonic()
        await asyncio.sleep(min(3.0, down_s / 2))
        result.notes["direct requests during the outage (ok/sent)"] = await _direct_requests(
            env, per_gateway=3
        )
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - cut_at)))
        await asyncio.to_thread(proxy.restore)
        result.recovery_s = await until(env.serving, "every service SERVING after NATS", 60)
        result.release_state = await env.release_end(route.release_id, timeout=150)
        final = await job_end(env.trainer, job.job_id, timeout=240)
    _count(result, load.since(t0))
    await _events(result, env, route.release_id)
    await _job_and_versions(result, env, final, adapter)
    return result


FAULTS: dict[str, Callable[[ChaosEnv], Awaitable[FaultResult]]] = {
    "inference": fault_inference_killed,
    "gateway": fault_gateway_killed,
    "redis": fault_redis_down,
    "nats": fault_nats_restarted,
    "monitor": fault_monitor_killed,
    "trainer": fault_trainer_killed,
    "registry": fault_registry_killed,
    "postgres": fault_postgres_down,
    "nats-unreachable": fault_nats_unreachable,
}
