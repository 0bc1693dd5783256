"""Releases under real load (issue 13): does a release ever cause the failures it guards
against, and does the monitor ever blame a healthy candidate for the platform's load?

The dev stack's topology (one gateway, one inference replica, the tiny model), as separate
processes. First the capacity: open-loop rates stepped up until p99 passes 3x its idle
value. Then, at 50%, 70% and 90% of that capacity, open-loop unary and streaming requests
while releases of each kind run one after another, each with a healthy candidate:

  canary      10% -> 50% -> 100% under the monitor's automatic analysis
  rollback    a canary rolled back by hand after its first seconds
  blue-green  checked on mirrored traffic, then switched to at once
  shadow      mirrored traffic only, ended by hand after its verdict

Reported per level: requests and failed requests (at 90% only refusals that say when to
retry are allowed), healthy candidates rolled back (target 0), and each release kind's
p99 against the level's steady phase (target <= +25% at 70%). Last, a candidate that fails
30% of its requests (injected at the replica) at 70% load: seconds from its first request
until it has 0% weight (target <= 5 s).

    python -m bench.release_under_load [--releases 10] [--levels 0.5,0.7,0.9]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import nats.errors

from bench.report import Report
from bench.zero_downtime import Load, Sample, _train
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.trainer.v1 import trainer_pb2_grpc
from ftops_devstack.chaos import loaded_everywhere
from ftops_devstack.servers import start_nats, start_redis
from ftops_devstack.stack import Stack
from ftops_runtime.events import METRICS_REQUESTS, ROUTE_CHANGED

NAME = "release_under_load"
ALIAS = "rul-bot"
KINDS = ("canary", "rollback", "blue-green", "shadow")
ANALYSIS = events_pb2.AnalysisSettings(min_requests=10, min_stable_requests=10, auto=True)
CANARY_STEPS = [10, 50, 100]
# A release that has not ended by then is ended by hand and counted as stuck.
RELEASE_LIMIT_S = 90.0
FAILING_TRIALS = 3


def _p99_ms(samples: list[Sample]) -> float:
    ok = sorted(s.latency_s * 1000 for s in samples if s.ok)
    return ok[min(len(ok) - 1, int(len(ok) * 0.99))] if ok else 0.0


async def _probe(client: gateway_pb2_grpc.GatewayServiceStub, rate: float, seconds: float) -> Load:
    load = Load(client, rate, phase="probe", alias=ALIAS)
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return load


async def find_capacity(
    client: gateway_pb2_grpc.GatewayServiceStub, notes: dict[str, float | str]
) -> float:
    """The open-loop rate at which p99 first passes 3x its idle value (or requests fail)."""
    await _probe(client, 5, 3)  # warm-up
    idle = _p99_ms((await _probe(client, 4, 8)).samples)
    notes["idle p99 (ms, 4 req/s)"] = round(idle, 1)

    async def over(rate: float) -> bool:
        load = await _probe(client, rate, 6)
        p99 = _p99_ms(load.samples)
        failed = sum(not s.ok for s in load.samples)
        notes[f"probe {rate:.0f} req/s"] = f"p99 {p99:.0f} ms, {failed} failed"
        await asyncio.sleep(2)  # let the queue drain between probes
        return p99 > 3 * idle or failed > 0.01 * len(load.samples)

    below, rate = 0.0, 10.0
    while rate < 1000 and not await over(rate):
        below, rate = rate, round(rate * 1.25 + 5)
    # Narrow the step that crossed: the coarse steps are 25% apart.
    for _ in range(2):
        middle = round((below + rate) / 2)
        if await over(middle):
            rate = middle
        else:
            below = middle
    return rate


@dataclass
class Routes:
    """The gateway's route.changed stream: when each release ended and how."""

    ended: dict[str, events_pb2.ReleaseSnapshot] = field(default_factory=dict)
    failed: BaseException | None = None

    async def run(self, nats_url: str, stop: asyncio.Event) -> None:
        try:
            await self._run(nats_url, stop)
        except Exception as exc:
            self.failed = exc
            raise

    async def _run(self, nats_url: str, stop: asyncio.Event) -> None:
        nc = await nats.connect(nats_url)
        try:
            sub = await nc.jetstream().subscribe(ROUTE_CHANGED, ordered_consumer=True)
            while not stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                snap = events_pb2.RouteChanged.FromString(msg.data).release
                if snap.state in ("promoted", "rolled_back", "replaced"):
                    self.ended.setdefault(snap.release_id, snap)
        finally:
            await nc.close()


@dataclass
class Blame:
    """What the gateway reported for candidates (metrics.requests): their failures by where
    they arose, and when a given version's first request finished."""

    failures: Counter[str] = field(default_factory=Counter)
    first_seen: dict[str, float] = field(default_factory=dict)

    async def run(self, nats_url: str, stop: asyncio.Event) -> None:
        nc = await nats.connect(nats_url)
        try:
            sub = await nc.jetstream().subscribe(METRICS_REQUESTS, ordered_consumer=True)
            while not stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                for r in events_pb2.RequestResultBatch.FromString(msg.data).results:
                    if r.arm not in ("candidate", "shadow"):
                        continue
                    began = r.finished_at.ToNanoseconds() / 1e9 - r.latency_ms / 1000
                    seen = self.first_seen.get(r.version_id)
                    self.first_seen[r.version_id] = began if seen is None else min(seen, began)
                    if r.status != "OK":
                        self.failures[f"{r.arm} {r.status} ({r.failure_origin or '?'})"] += 1
        finally:
            await nc.close()


class Releaser:
    """Runs releases of each kind between two healthy versions, as an operator would."""

    def __init__(
        self,
        admin: gateway_pb2_grpc.GatewayServiceStub,
        replica: inference_pb2_grpc.InferenceServiceStub,
        routes: Routes,
        a: str,
        b: str,
    ) -> None:
        self.admin, self.replica, self.routes = admin, replica, routes
        self.stable, self.other = a, b
        # Why healthy candidates were rolled back, by the monitor's reason.
        self.reasons: Counter[str] = Counter()

    async def route(self) -> gateway_pb2.Route:
        got: gateway_pb2.Route = await self.admin.GetRoute(gateway_pb2.GetRouteRequest(alias=ALIAS))
        return got

    async def start(self, strategy: int, candidate: str) -> str:
        route = await self.admin.StartRelease(
            gateway_pb2.StartReleaseRequest(
                alias=ALIAS,
                candidate_version_id=candidate,
                strategy=strategy,  # type: ignore[arg-type]
                steps=CANARY_STEPS if strategy == events_pb2.RELEASE_STRATEGY_CANARY else [],
                analysis=ANALYSIS,
            )
        )
        return str(route.release_id)

    async def ready(self, version_id: str) -> None:
        """Loaded on the replica, as adapter.ready leaves a new version before its release
        (a rolled-back candidate is retired and unloaded; a release of it again would
        measure a cold load, which is not what this benchmark is about)."""
        await self.replica.LoadAdapter(
            inference_pb2.LoadAdapterRequest(version_id=version_id), timeout=120
        )

    async def _ended(self, release_id: str, limit_s: float) -> events_pb2.ReleaseSnapshot | None:
        if self.routes.failed is not None:
            raise RuntimeError(f"route.changed watcher failed: {self.routes.failed!r}")
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if release_id in self.routes.ended:
                return self.routes.ended[release_id]
            await asyncio.sleep(0.1)
        return None

    async def _by_hand(self, reason: str) -> None:
        try:
            await self.admin.RollbackRelease(
                gateway_pb2.ReleaseCommandRequest(alias=ALIAS, reason=reason)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # it ended meanwhile
                raise

    async def run(self, kind: str) -> str:
        """One release of ``kind``; returns its outcome: "ok", "healthy rolled back" or
        "stuck"."""
        strategy = {
            "canary": events_pb2.RELEASE_STRATEGY_CANARY,
            "rollback": events_pb2.RELEASE_STRATEGY_CANARY,
            "blue-green": events_pb2.RELEASE_STRATEGY_BLUE_GREEN,
            "shadow": events_pb2.RELEASE_STRATEGY_SHADOW,
        }[kind]
        await self.ready(self.other)
        release_id = await self.start(strategy, self.other)
        if kind in ("rollback", "shadow"):
            # Ended by hand: a rollback a few seconds in, a shadow once it had its verdict.
            ended = await self._ended(release_id, 3.0 if kind == "rollback" else 8.0)
            if ended is None:
                await self._by_hand(f"bench: {kind} ended by hand")
        ended = await self._ended(release_id, RELEASE_LIMIT_S)
        if ended is None:
            await self._by_hand("bench: stuck")
            return "stuck"
        if ended.state == "promoted":
            self.stable, self.other = self.other, self.stable
            return "ok"
        if ended.change.manual:
            return "ok"
        self.reasons[f"{kind}: {ended.change.reason}"] += 1
        return "healthy rolled back"


@dataclass
class Level:
    share: float
    rate: float
    load: Load
    outcomes: Counter[str] = field(default_factory=Counter)


async def run_level(
    level: Level, releaser: Releaser, releases: int, steady_s: float
) -> dict[str, float | str]:
    notes: dict[str, float | str] = {}
    stop = asyncio.Event()
    traffic = asyncio.create_task(level.load.run(stop))
    try:
        await asyncio.sleep(3)
        level.load.phase = "steady"
        await asyncio.sleep(steady_s)
        for i in range(releases):
            # Quiet windows between the rounds, pooled with the first one: the baseline
            # drifts with the machine as much as the releases move it.
            level.load.phase = "steady"
            await asyncio.sleep(4)
            for kind in KINDS:
                level.load.phase = kind
                level.outcomes[f"{kind} {await releaser.run(kind)}"] += 1
                await asyncio.sleep(1)
            print(f"  {level.share:.0%}: {i + 1}/{releases} rounds {dict(level.outcomes)}")
    finally:
        stop.set()
        await traffic
    return notes


async def failing_candidate(
    client: gateway_pb2_grpc.GatewayServiceStub,
    releaser: Releaser,
    blame: Blame,
    bad: str,
    rate: float,
) -> list[float]:
    """Seconds from a 30%-failing candidate's first request to its 0% weight."""
    load = Load(client, rate, phase="failing", alias=ALIAS)
    stop = asyncio.Event()
    traffic = asyncio.create_task(load.run(stop))
    times: list[float] = []
    try:
        await asyncio.sleep(5)
        for _ in range(FAILING_TRIALS):
            blame.first_seen.pop(bad, None)
            release_id = await releaser.start(events_pb2.RELEASE_STRATEGY_CANARY, bad)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                route = await releaser.route()
                if route.release_id == release_id and not route.candidate_version_id:
                    break
                await asyncio.sleep(0.02)
            at_zero = time.time()
            await asyncio.sleep(1.5)  # its last results reach the tally
            first = blame.first_seen.get(bad)
            times.append(round(at_zero - first, 2) if first else float("nan"))
            await asyncio.sleep(2)
    finally:
        stop.set()
        await traffic
    return times


async def _run(
    report: Report, releases: int, shares: list[float], steady_s: float
) -> dict[str, float | str]:
    from ftops_tinymodel import build

    notes: dict[str, float | str] = {}
    nats_server, redis = start_nats(), start_redis()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), nats_server.url, redis.url, build())
        stop = asyncio.Event()
        routes, blame = Routes(), Blame()
        watchers: list[asyncio.Task[None]] = []
        try:
            stack.start()
            await stack.wait_serving()
            # After the services created their streams (a watcher needs its stream).
            watchers += [
                asyncio.create_task(routes.run(nats_server.url, stop)),
                asyncio.create_task(blame.run(nats_server.url, stop)),
            ]
            async with (
                grpc.aio.insecure_channel(stack.address("trainer")) as tch,
                grpc.aio.insecure_channel(stack.address("gateway")) as admin_ch,
                grpc.aio.insecure_channel(stack.address("gateway")) as client_ch,
                grpc.aio.insecure_channel(stack.address("inference")) as inference_ch,
            ):
                trainer = trainer_pb2_grpc.TrainerServiceStub(tch)
                admin = gateway_pb2_grpc.GatewayServiceStub(admin_ch)
                client = gateway_pb2_grpc.GatewayServiceStub(client_ch)
                a, b, bad = [await _train(trainer, seed, ALIAS) for seed in (1, 2, 3)]
                await loaded_everywhere(stack, [a, b, bad])
                await admin.SetRoute(gateway_pb2.SetRouteRequest(alias=ALIAS, version_id=a))
                capacity = await find_capacity(client, notes)
                notes["capacity (req/s, p99 > 3x idle)"] = capacity
                replica = inference_pb2_grpc.InferenceServiceStub(inference_ch)
                releaser = Releaser(admin, replica, routes, a, b)
                for share in shares:
                    rate = round(share * capacity, 1)
                    level = Level(share, rate, Load(client, rate, alias=ALIAS))
                    blame.failures.clear()
                    await run_level(level, releaser, releases, steady_s)
                    _summarize(report, level, notes)
                    for key, count in sorted(releaser.reasons.items()):
                        notes[f"{share:.0%}: healthy rollback reason: {key}"] = count
                    releaser.reasons.clear()
                    for key, count in sorted(blame.failures.items()):
                        notes[f"{share:.0%}: candidate results failed: {key}"] = count
                    await asyncio.sleep(2)
                # The failing candidate: the replica fails 30% of its requests.
                stack.extra_env.update(
                    {"FTOPS_FAULT_ERROR_RATE": "0.3", "FTOPS_FAULT_VERSIONS": bad}
                )
                await stack.restart("inference")
                for version in (releaser.stable, bad):
                    await releaser.ready(version)
                times = await failing_candidate(
                    client, releaser, blame, bad, round(0.7 * capacity, 1)
                )
                notes["30%-failing candidate at 70%: first request -> 0% weight (s)"] = str(times)
                finite = [t for t in times if t == t]
                if finite:
                    notes["30%-failing candidate: median s"] = round(statistics.median(finite), 2)
        finally:
            stop.set()
            await asyncio.gather(*watchers, return_exceptions=True)
            stack.stop()
            redis.stop()
            nats_server.stop()
    return notes


def _summarize(report: Report, level: Level, notes: dict[str, float | str]) -> None:
    tag = f"{level.share:.0%}"
    samples = [s for s in level.load.samples if s.phase != "warmup"]
    steady = [s for s in samples if s.phase == "steady"]
    steady_p99 = _p99_ms(steady)
    report.add(f"{tag} steady", [s.latency_s for s in steady if s.ok] or [0.0])
    for kind in KINDS:
        phase = [s for s in samples if s.phase == kind]
        if not phase:
            continue
        row = report.add(f"{tag} {kind}", [s.latency_s for s in phase if s.ok] or [0.0])
        if steady_p99:
            notes[f"{tag}: {kind} p99 vs steady"] = f"{row.p99_ms / steady_p99 - 1:+.0%}"
    failed = [s for s in samples if not s.ok]
    with_advice = sum("retry after" in s.error for s in failed)
    notes[f"{tag}: rate (req/s)"] = level.rate
    notes[f"{tag}: requests"] = len(samples)
    notes[f"{tag}: failed requests"] = f"{len(failed)} ({with_advice} refusals with retry-after)"
    for error, count in Counter(s.error.split(" (retry")[0] for s in failed).most_common(3):
        notes[f"{tag}: failure"] = f"{count} x {error}"
    rolled = sum(n for k, n in level.outcomes.items() if k.endswith("healthy rolled back"))
    runs = sum(level.outcomes.values())
    notes[f"{tag}: healthy candidates rolled back"] = f"{rolled} of {runs}"
    stuck = sum(n for k, n in level.outcomes.items() if k.endswith("stuck"))
    if stuck:
        notes[f"{tag}: releases stuck"] = stuck


async def main(
    releases: int = 10, shares: list[float] | None = None, steady_s: float = 15.0
) -> Path:
    report = Report(
        NAME,
        "open-loop unary+streaming load at shares of capacity through 1 gateway and 1 "
        "inference replica while canary, rollback, blue-green and shadow releases run",
        "each level's steady phase (no release running)",
    )
    report.notes.update(await _run(report, releases, shares or [0.5, 0.7, 0.9], steady_s))
    return report.write()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--releases", type=int, default=10, help="rounds of the 4 kinds per level")
    parser.add_argument("--levels", default="0.5,0.7,0.9", help="shares of capacity")
    parser.add_argument("--steady", type=float, default=15.0)
    args = parser.parse_args()
    asyncio.run(main(args.releases, [float(x) for x in args.levels.split(",")], args.steady))
