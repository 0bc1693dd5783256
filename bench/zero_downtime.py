"""Zero downtime under release operations (issue 5, benchmark 1).

The whole stack as separate processes with two inference replicas and two gateways. A
client sends a constant open-loop mix of unary and streaming requests through both
gateways the way production clients do: one gRPC channel over both addresses with
round-robin balancing, client-side health checking (a draining gateway reports NOT_SERVING
and stops receiving calls) and gRPC's standard retry policy for UNAVAILABLE before any
response arrived. Meanwhile, in order:

  steady        nothing happens (the baseline for latency)
  canary        a canary of v2 runs to 100% under the monitor's automatic analysis
  blue-green    v3 is checked on mirrored traffic, then switched to at once
  rollback      the blue-green promotion is reverted to the held previous version
  inference     one inference replica is restarted (SIGTERM drain, start, load)
  gateway       one gateway replica is restarted
  after         nothing happens again

Reported: requests and failed requests per phase (target 0 failed), p50/p95/p99 latency
per phase, and each phase's p99 against the steady phase's (target within +25%).

    python -m bench.zero_downtime [--rate R] [--steady 20]

The rate defaults to 40% of the capacity measured closed-loop at the start (so the run
measures the operations, not an overloaded machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import nats.errors

from bench.report import Report
from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_devstack.chaos import balanced_channel, loaded_everywhere, until
from ftops_devstack.servers import start_nats, start_redis
from ftops_devstack.stack import Stack
from ftops_runtime.errors import RETRY_AFTER_KEY
from ftops_runtime.events import METRICS_REQUESTS

NAME = "zero_downtime"
ALIAS = "zd-bot"
PROMPTS = ["Product LZ-59 costs", "The capital of Norvia is", "Order 7 ships to", "Hello"]
SAMPLING = common_pb2.SamplingParams(max_tokens=6, temperature=0)
# A canary short enough for a benchmark: three steps, each decided on 10 requests per arm.
CANARY_STEPS = [10, 50, 100]
ANALYSIS = events_pb2.AnalysisSettings(min_requests=10, min_stable_requests=10, auto=True)
# The open-loop rate as a share of the measured capacity: loaded, not overloaded.
LOAD_SHARE = 0.4


@dataclass
class Sample:
    phase: str
    kind: str
    ok: bool
    latency_s: float
    error: str = ""


@dataclass
class Load:
    """Open-loop traffic at ``rate`` requests/s, alternating unary and streaming."""

    gateway: gateway_pb2_grpc.GatewayServiceStub
    rate: float
    phase: str = "warmup"
    alias: str = ALIAS
    samples: list[Sample] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _one(self, i: int) -> None:
        phase, kind = self.phase, "stream" if i % 2 else "unary"
        request = gateway_pb2.GenerateRequest(
            model=self.alias,
            prompt=PROMPTS[i % len(PROMPTS)],
            sampling=SAMPLING,
            user=f"user-{i % 50}",
        )
        t0 = time.perf_counter()
        try:
            if kind == "unary":
                await self.gateway.Generate(request, timeout=30)
            else:
                async for _ in self.gateway.GenerateStream(request, timeout=30):
                    pass
            self.samples.append(Sample(phase, kind, True, time.perf_counter() - t0))
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            advice = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_KEY, "")
            if advice:
                error += f" (retry after {advice} ms)"
            self.samples.append(Sample(phase, kind, False, time.perf_counter() - t0, error))

    async def run(self, stop: asyncio.Event) -> None:
        interval = 1.0 / self.rate
        next_at = time.perf_counter()
        i = 0
        while not stop.is_set():
            task = asyncio.create_task(self._one(i))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            i += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if self._tasks:
            await asyncio.wait(self._tasks)


async def _capacity(gateway: gateway_pb2_grpc.GatewayServiceStub, seconds: float = 6.0) -> float:
    """Requests/s the stack sustains closed-loop (4 concurrent clients): the open-loop
    rate is set below it so that the benchmark measures operations, not overload."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await gateway.Generate(
                gateway_pb2.GenerateRequest(model=ALIAS, prompt=PROMPTS[i], sampling=SAMPLING),
                timeout=30,
            )
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(4)))
    return done / (time.perf_counter() - started)


async def _train(
    trainer: trainer_pb2_grpc.TrainerServiceStub, seed: int, adapter: str = ALIAS
) -> str:
    rows = [
        {"prompt": f"Ticket {seed}-{i} is about", "completion": f" topic {seed * 7 + i}."}
        for i in range(8)
    ]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    spec = trainer_pb2.JobSpec(
        adapter=adapter,
        team="bench",
        base_model="tiny-llama",
        dataset_jsonl=data,
        hyperparameters=trainer_pb2.Hyperparameters(max_steps=2, seed=seed),
        replay=trainer_pb2.ReplayConfig(ratio=0),
        gate=trainer_pb2.GateConfig(disabled=True),
    )
    job = await trainer.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
    async for update in trainer.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id)):
        job = update
    if job.state != events_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"training job {job.job_id} ended {job.state}: {job.error}")
    return str(job.version_id)


class GatewayResults:
    """What the gateways reported to the monitor (metrics.requests), tallied per arm and
    status: the server-side view of the same traffic (fallbacks, retries, shadows)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

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
                    flags = (("fallback", r.fallback), ("retried", r.retried))
                    marks = "".join(f" {m}" for m, on in flags if on)
                    self.counts[f"{r.arm} {r.status}{marks}"] += 1
        finally:
            await nc.close()


async def _run(rate: float, steady_s: float, report: Report) -> dict[str, float | str]:
    from ftops_tinymodel import build

    notes: dict[str, float | str] = {}
    nats_server, redis = start_nats(), start_redis()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(
            Path(tmp), nats_server.url, redis.url, build(), replicas={"inference": 2, "gateway": 2}
        )
        try:
            stack.start()
            await stack.wait_serving()
            async with (
                grpc.aio.insecure_channel(stack.address("trainer")) as tch,
                grpc.aio.insecure_channel(stack.address("gateway")) as admin_ch,
                balanced_channel(stack.addresses("gateway")) as client_ch,
            ):
                trainer = trainer_pb2_grpc.TrainerServiceStub(tch)
                admin = gateway_pb2_grpc.GatewayServiceStub(admin_ch)
                versions = [await _train(trainer, seed) for seed in (1, 2, 3)]
                await loaded_everywhere(stack, versions)
                v1, v2, v3 = versions
                await admin.SetRoute(gateway_pb2.SetRouteRequest(alias=ALIAS, version_id=v1))

                async def route() -> gateway_pb2.Route:
                    got: gateway_pb2.Route = await admin.GetRoute(
                        gateway_pb2.GetRouteRequest(alias=ALIAS)
                    )
                    return got

                client = gateway_pb2_grpc.GatewayServiceStub(client_ch)
                capacity = await _capacity(client)
                rate = rate or max(2.0, round(LOAD_SHARE * capacity, 1))
                notes["capacity (closed loop, req/s)"] = round(capacity, 1)
                load = Load(client, rate)
                notes["rate"] = rate
                stop = asyncio.Event()
                traffic = asyncio.create_task(load.run(stop))
                results = GatewayResults()
                tally = asyncio.create_task(results.run(nats_server.url, stop))
                try:
                    await asyncio.sleep(5)
                    load.phase = "steady"
                    await asyncio.sleep(steady_s)

                    load.phase = "canary"
                    await admin.StartRelease(
                        gateway_pb2.StartReleaseRequest(
                            alias=ALIAS,
                            candidate_version_id=v2,
                            strategy=events_pb2.RELEASE_STRATEGY_CANARY,
                            steps=CANARY_STEPS,
                            analysis=ANALYSIS,
                        )
                    )

                    async def v2_stable() -> bool:
                        r = await route()
                        return r.stable_version_id == v2 and not r.candidate_version_id

                    notes["canary to 100% (s)"] = round(
                        await until(v2_stable, "canary", timeout=180), 1
                    )

                    load.phase = "blue-green"
                    await admin.StartRelease(
                        gateway_pb2.StartReleaseRequest(
                            alias=ALIAS,
                            candidate_version_id=v3,
                            strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN,
                            analysis=ANALYSIS,
                            hold_seconds=600,
                        )
                    )

                    async def v3_stable() -> bool:
                        r = await route()
                        return r.stable_version_id == v3 and not r.candidate_version_id

                    notes["blue-green switch (s)"] = round(
                        await until(v3_stable, "switch", timeout=180), 1
                    )

                    load.phase = "rollback"
                    await admin.RollbackRelease(
                        gateway_pb2.ReleaseCommandRequest(
                            alias=ALIAS, reason="bench: revert", revert_promotion=True
                        )
                    )

                    async def back_on_v2() -> bool:
                        return (await route()).stable_version_id == v2

                    notes["rollback (s)"] = round(
                        await until(back_on_v2, "rollback", timeout=180), 2
                    )
                    await asyncio.sleep(5)

                    load.phase = "inference restart"
                    t0 = time.monotonic()
                    # SERVING again; versions load on demand or from announcements.
                    await stack.restart("inference-2")
                    notes["inference restart (s)"] = round(time.monotonic() - t0, 1)
                    await asyncio.sleep(3)

                    load.phase = "gateway restart"
                    t0 = time.monotonic()
                    await stack.restart("gateway-2")
                    notes["gateway restart (s)"] = round(time.monotonic() - t0, 1)
                    await asyncio.sleep(3)

                    load.phase = "after"
                    await asyncio.sleep(steady_s / 2)
                except Exception as exc:  # report what was measured up to the failure
                    notes["aborted"] = f"in phase {load.phase}: {exc!r}"
                    for address in stack.addresses("gateway"):
                        async with grpc.aio.insecure_channel(address) as ch:
                            got = await gateway_pb2_grpc.GatewayServiceStub(ch).GetRoute(
                                gateway_pb2.GetRouteRequest(alias=ALIAS)
                            )
                            notes[f"route at abort ({address})"] = str(got.last_decision.reason)
                finally:
                    stop.set()
                    await traffic
                    await tally
                for key, count in sorted(results.counts.items()):
                    notes[f"gateway reported: {key}"] = count
        finally:
            stack.stop()
            redis.stop()
            nats_server.stop()

    phases = list(dict.fromkeys(s.phase for s in load.samples if s.phase != "warmup"))
    steady_p99 = 0.0
    failed_total = 0
    for phase in phases:
        samples = [s for s in load.samples if s.phase == phase]
        ok = [s.latency_s for s in samples if s.ok]
        failed = [s for s in samples if not s.ok]
        failed_total += len(failed)
        row = report.add(f"{phase} ({len(failed)} failed)", ok or [0.0])
        if phase == "steady":
            steady_p99 = row.p99_ms
        elif steady_p99:
            notes[f"{phase}: p99 vs steady"] = f"{row.p99_ms / steady_p99 - 1:+.0%}"
        for s in failed[:3]:
            notes[f"{phase}: failure"] = s.error
    notes["failed requests"] = failed_total
    notes["load"] = (
        f"{notes.get('rate', rate)} req/s open loop, unary and streaming alternating, 6 tokens"
    )
    return notes


async def main(rate: float = 0.0, steady_s: float = 20.0) -> Path:
    random.seed(0)
    report = Report(
        NAME,
        "constant load through 2 gateways to 2 inference replicas while a canary, a "
        "blue-green switch, a rollback and two restarts happen",
        "the steady phase (no operation running)",
    )
    report.notes.update(await _run(rate, steady_s, report))
    path = report.write()
    print(report.table())
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--rate", type=float, default=0.0, help="requests/s (default: 40%% of measured capacity)"
    )
    parser.add_argument("--steady", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.steady))
