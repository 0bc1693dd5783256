"""Rollback speed (issue 5, bench 2): how fast a bad canary is taken back to 0%.

A real gateway and a real monitor (their service objects, over real NATS and Redis) with
default release settings (canary 5/25/50/100, default analysis, mirrored evidence at its
default 20%: during the 5% step a further 15% of the traffic is mirrored from stable requests
to the candidate and judged with its own requests); 50 requests/s of open-loop client
traffic through the gateway. The inference replica is a stand-in servicer started
here whose latency and faults are set per version (the same faults the inference service's
``fault_*`` settings inject, but exact and instant to set): the stable version answers in
~20 ms; the candidate either fails 30% of its requests (INTERNAL, so the gateway's retry on
another replica does not mask it) or answers 2x slower.

Measured per case: seconds from the candidate's first request (answered or mirrored) to the
route holding it at 0%, how many requests the candidate answered users meanwhile and how
many mirrored ones it served, and the client-visible failures (the stable version answers
for a failing candidate, so this should be 0). The 30%-errors case is also run with the
mirror off (``evidence_mirror_percent`` 0): the 5% step's own traffic alone, the baseline.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.report import Report
from ftops.common.v1 import common_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_devstack.servers import start_nats, start_redis
from ftops_gateway.service import GatewayService
from ftops_gateway.settings import GatewaySettings
from ftops_monitor.service import MonitorService
from ftops_monitor.settings import MonitorSettings
from ftops_runtime.client import channel

RATE = 50.0  # client requests per second
RUNS = 10  # releases per case
STABLE_MS = 20.0
TIMEOUT_S = 120.0  # give up on a case after this long
VERSIONS = ("ver_stable", "ver_errors", "ver_slow")


@dataclass
class Fault:
    error_rate: float = 0.0
    slowdown: float = 1.0


@dataclass
class StandIn(inference_pb2_grpc.InferenceServiceServicer):
    """Answers after ~STABLE_MS x slowdown; fails error_rate of a version's requests."""

    faults: dict[str, Fault] = field(default_factory=dict)
    # Per version: (when, mirrored) of every call; the gateway names mirrors "<id>-shadow".
    calls: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    async def Generate(self, request: Any, context: Any) -> inference_pb2.GenerateResponse:
        mirrored = request.request_id.endswith("-shadow")
        self.calls.setdefault(request.version_id, []).append((time.monotonic(), mirrored))
        fault = self.faults.get(request.version_id, Fault())
        await asyncio.sleep(STABLE_MS * fault.slowdown * self.rng.uniform(0.8, 1.2) / 1000)
        if self.rng.random() < fault.error_rate:
            await context.abort(grpc.StatusCode.INTERNAL, "injected fault")
        return inference_pb2.GenerateResponse(
            request_id=request.request_id,
            version_id=request.version_id,
            text=f"answer of {request.version_id}",
            prompt_tokens=4,
            completion_tokens=8,
            finish_reason=common_pb2.FINISH_REASON_EOS,
        )

    async def GenerateStream(
        self, request: Any, context: Any
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        reply = await self.Generate(request, context)
        yield inference_pb2.GenerateChunk(
            request_id=reply.request_id, version_id=reply.version_id, text=reply.text
        )


class Registry(registry_pb2_grpc.RegistryServiceServicer):
    async def GetVersion(self, request: Any, context: Any) -> registry_pb2.Version:
        ref = request.version_id or request.name
        if ref not in VERSIONS:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"version {ref!r} not found")
        return registry_pb2.Version(version_id=ref, adapter="bot", base_model="tiny")

    async def GetRelease(self, request: Any, context: Any) -> registry_pb2.Release:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no history here")
        raise AssertionError


async def _server(add: Any) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@dataclass
class Outcome:
    seconds: float
    candidate_requests: int
    mirrored_requests: int
    client_failures: int
    client_requests: int
    state: str
    reason: str


async def _case(
    gw: GatewayService,
    stub: gateway_pb2_grpc.GatewayServiceStub,
    standin: StandIn,
    bad: str,
    evidence_mirror_percent: int | None = None,
) -> Outcome:
    alias = f"bot-{uuid.uuid4().hex[:6]}"
    await gw.releases.set_route(alias, "ver_stable")
    client_failures = client_requests = 0
    stop = asyncio.Event()

    async def one() -> None:
        nonlocal client_failures, client_requests
        client_requests += 1
        try:
            await stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt="q"), timeout=10)
        except grpc.aio.AioRpcError:
            client_failures += 1

    async def load() -> None:
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        sent = 0
        while not stop.is_set():
            due = start + sent / RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.gather(*tasks)

    loader = asyncio.create_task(load())
    await asyncio.sleep(3.0)  # a baseline for the stable arm, as in production
    standin.calls.pop(bad, None)
    request = gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id=bad)
    if evidence_mirror_percent is not None:
        request.evidence_mirror_percent = evidence_mirror_percent
    await gw.releases.start_release(request)
    deadline = time.monotonic() + TIMEOUT_S
    route = gw.routes.get(alias)
    while time.monotonic() < deadline:
        route = gw.routes.get(alias)
        if route is not None and not route.candidate_version_id:
            break
        await asyncio.sleep(0.01)
    ended = time.monotonic()
    stop.set()
    await loader
    calls = [c for c in standin.calls.get(bad, []) if c[0] <= ended]
    first = calls[0][0] if calls else ended
    assert route is not None
    return Outcome(
        seconds=ended - first,
        candidate_requests=sum(not mirrored for _, mirrored in calls),
        mirrored_requests=sum(mirrored for _, mirrored in calls),
        client_failures=client_failures,
        client_requests=client_requests,
        state=route.release_state or "running (timed out)",
        reason=route.last_decision.reason,
    )


async def main() -> None:
    nats, redis = start_nats(), start_redis()
    faults = {"ver_errors": Fault(error_rate=0.3), "ver_slow": Fault(slowdown=2.0)}
    standin = StandIn(faults=faults)  # type: ignore[abstract]
    inf_server, inference = await _server(
        lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(standin, s)
    )
    reg_server, registry = await _server(
        lambda s: registry_pb2_grpc.add_RegistryServiceServicer_to_server(Registry(), s)  # type: ignore[abstract]
    )
    gw = GatewayService(
        GatewaySettings(
            grpc_port=0,
            nats_url=nats.url,
            redis_url=redis.url,
            registry_address=registry,
            inference_endpoints=inference,
            instance_id="bench-gw",
            auth_mode="disabled",  # the fake registry has no Authenticate
        )
    )
    monitor = MonitorService(
        MonitorSettings(
            grpc_port=0,
            nats_url=nats.url,
            instance_id="bench-mon",
            registry_address=registry,
            auth_mode="disabled",
            metrics_port=-1,
        )
    )
    try:
        await gw.start()
        await monitor.start()
        await gw.bus.wait_ready(10)
        await monitor.bus.wait_ready(10)
        await asyncio.sleep(1.0)  # consumers bound before the first release
        report = Report(
            "rollback_speed",
            f"canary with default settings at {RATE:.0f} req/s; time from the bad candidate's "
            "first request to 0%",
            f"stable version ~{STABLE_MS:.0f} ms, no faults",
        )
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            cases: tuple[tuple[str, str, int | None], ...] = (
                ("30% errors", "ver_errors", None),
                ("2x slower", "ver_slow", None),
                ("30% errors, mirror off", "ver_errors", 0),
            )
            for name, bad, evidence in cases:
                outcomes = [await _case(gw, stub, standin, bad, evidence) for _ in range(RUNS)]
                report.add(f"{name}: time to 0%", [o.seconds for o in outcomes])
                report.notes[f"{name}: seconds to 0% per run"] = ", ".join(
                    f"{o.seconds:.2f}" for o in outcomes
                )
                report.notes[f"{name}: requests the candidate answered users per run"] = ", ".join(
                    str(o.candidate_requests) for o in outcomes
                )
                report.notes[f"{name}: mirrored requests it served per run"] = ", ".join(
                    str(o.mirrored_requests) for o in outcomes
                )
                report.notes[f"{name}: within 5 s"] = (
                    f"{sum(o.seconds <= 5.0 for o in outcomes)} of {len(outcomes)}"
                )
                report.notes[f"{name}: client-visible failures"] = (
                    f"{sum(o.client_failures for o in outcomes)} of "
                    f"{sum(o.client_requests for o in outcomes)}"
                )
                report.notes[f"{name}: outcome (last run)"] = (
                    f"{outcomes[-1].state}: {outcomes[-1].reason}"
                )
        report.write()
    finally:
        await monitor.stop()
        await gw.stop()
        await inf_server.stop(0)
        await reg_server.stop(0)
        redis.stop()
        nats.stop()


if __name__ == "__main__":
    asyncio.run(main())
