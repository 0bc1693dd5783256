"""Canary "mirrored evidence" through a real gateway (gRPC, Redis, NATS; fake registry and
inference): stable requests mirrored to the candidate at a small step return the stable
answer and are reported as the candidate's shadow results; from a step at the evidence
share on nothing is mirrored; the monitor judges the canary on them; the setting through
the API and the CLI."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from test_gateway_cli import _cli, _json  # type: ignore[import-not-found]
from test_gateway_service import (  # type: ignore[import-not-found]
    Fakes,
    _alias,
    _collect,
    _gateway,
    _monitor,
    _settings,
    _until,
    _wait_route,
    bus,
    fakes,
)

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops_gateway.service import GatewayService
from ftops_runtime.bus import EventBus
from ftops_runtime.client import channel
from ftops_runtime.events import METRICS_REQUESTS, RELEASE_PROMOTE, RELEASE_STARTED, new_meta

pytestmark = pytest.mark.integration
__all__ = ["bus", "fakes"]  # fixtures shared with test_gateway_service


async def _send(
    stub: gateway_pb2_grpc.GatewayServiceStub, alias: str, n: int, tag: str
) -> list[gateway_pb2.GenerateResponse]:
    replies: list[gateway_pb2.GenerateResponse] = []
    for start in range(0, n, 25):  # a few in flight at a time, like clients
        replies += await asyncio.gather(
            *(
                stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt=f"{tag}{i}"))
                for i in range(start, min(start + 25, n))
            )
        )
    return replies


async def test_mirrored_requests_answer_stable_and_report_candidate_shadow_results(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    metrics = await _collect(bus, METRICS_REQUESTS)
    started = await _collect(bus, RELEASE_STARTED)
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()

    def results() -> list[events_pb2.RequestResult]:
        return [r for b in metrics.events for r in b.results if r.alias == alias]

    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            route = await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c")
            )
            assert (route.candidate_weight, route.evidence_mirror_percent) == (5, 20)
            event = await started.wait_for(lambda e: e.alias == alias)
            assert event.evidence_mirror_percent == 20

            # Step 5%: 15/95 of the stable requests are also sent to the candidate.
            replies = await _send(stub, alias, 300, "a")
            for reply in replies:
                assert reply.text.startswith(f"[{reply.version_id}]")
            stable_ids = {r.request_id for r in replies if r.arm == "stable"}
            candidate_ids = {r.request_id for r in replies if r.arm == "candidate"}
            assert {r.version_id for r in replies if r.arm == "stable"} == {"ver_s"}
            await _until(lambda: sum(not r.shadow for r in results()) == 300)
            await asyncio.sleep(0.5)  # mirrors report once both answers are in
            shadows = [r for r in results() if r.shadow]
            # Binomial(~285, 0.158): mean 45, sd 6.
            assert 20 <= len(shadows) <= 75, len(shadows)
            for result in shadows:
                assert (result.arm, result.version_id, result.status) == ("shadow", "ver_c", "OK")
                assert result.release_id == route.release_id
                # Mirrored from a request the stable version answered, never a candidate one.
                assert result.shadow_of in stable_ids
                assert result.request_id == f"{result.shadow_of}-shadow"
                # "[ver_s] aN" against "[ver_c] aN": one word of two differs.
                assert result.divergence == pytest.approx(0.5)
            # User-facing candidate traffic is only the candidate's own requests.
            own = [r for r in results() if r.arm == "candidate"]
            assert {r.request_id for r in own} == candidate_ids
            assert all(not r.shadow for r in own)

            # The next step (25%) is at or above the 20% evidence share: no more mirrors.
            await bus.publish(
                RELEASE_PROMOTE,
                events_pb2.ReleasePromote(
                    meta=new_meta("monitor", "t"),
                    release_id=route.release_id,
                    alias=alias,
                    candidate_version_id="ver_c",
                    stable_version_id="ver_s",
                    step_index=1,
                    weight=25,
                ),
            )
            await _wait_route(gw, alias, lambda r: r.candidate_weight == 25, 5)
            later = await _send(stub, alias, 100, "b")
            later_ids = {r.request_id for r in later}
            await _until(lambda: sum(not r.shadow for r in results()) == 400)
            await asyncio.sleep(0.5)
            assert [r for r in results() if r.shadow and r.shadow_of in later_ids] == []
    finally:
        await gw.stop()


async def test_evidence_mirror_off_and_invalid_values(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    metrics = await _collect(bus, METRICS_REQUESTS)
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            before = await stub.SetRoute(
                gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s")
            )
            bad: list[tuple[dict[str, Any], str]] = [
                ({"evidence_mirror_percent": 101}, "outside 0..100"),
                (
                    {
                        "evidence_mirror_percent": 20,
                        "strategy": events_pb2.RELEASE_STRATEGY_BLUE_GREEN,
                    },
                    "canary releases only",
                ),
            ]
            for fields, text in bad:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.StartRelease(
                        gateway_pb2.StartReleaseRequest(
                            alias=alias, candidate_version_id="ver_c", **fields
                        )
                    )
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert text in (err.value.details() or "")
            assert await gw.store.get(alias) == before

            route = await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=alias, candidate_version_id="ver_c", evidence_mirror_percent=0
                )
            )
            assert route.evidence_mirror_percent == 0
            await _send(stub, alias, 100, "x")
            await _until(
                lambda: sum(r.alias == alias for b in metrics.events for r in b.results) >= 100
            )
            await asyncio.sleep(0.5)
            assert not [
                r for b in metrics.events for r in b.results if r.alias == alias and r.shadow
            ]
    finally:
        await gw.stop()


async def test_cli_release_start_takes_the_evidence_share(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        await _cli(gw, "route", "set", alias, "ver_s")
        started = await _cli(
            gw, "release", "start", alias, "ver_c", "--evidence-mirror-percent", "30", "-o", "json"
        )
        route = _json(started)
        assert (route["candidateWeight"], route["evidenceMirrorPercent"]) == (5, 30)
        table = await _cli(gw, "route", "get", alias)
        assert "30% (5% answered + 25% mirrored from stable)" in table.stdout
        await _cli(gw, "release", "rollback", alias)
        refused = await _cli(
            gw, "release", "start", alias, "ver_c", "--evidence-mirror-percent", "120", ok=False
        )
        assert refused.exit_code != 0
    finally:
        await gw.stop()


async def test_monitor_rolls_a_small_canary_back_on_mirrored_evidence(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    """A 1% step sees almost no candidate requests of its own; the mirrored ones fail and
    the monitor rolls the candidate back on them. Clients only ever get stable answers."""
    gw = await _gateway(_settings(nats_url, redis_url, fakes))
    monitor = await _monitor(nats_url, fakes)
    alias = _alias()
    try:
        await asyncio.sleep(0.5)  # the monitor's route.changed consumer is bound
        await gw.releases.set_route(alias, "ver_s")
        await gw.releases.start_release(
            gateway_pb2.StartReleaseRequest(
                alias=alias,
                candidate_version_id="ver_bad",
                steps=[1, 100],
                evidence_mirror_percent=50,
                analysis=events_pb2.AnalysisSettings(min_requests=10, auto=True),
            )
        )
        await asyncio.sleep(0.3)  # route.changed reached the monitor
        for i in range(80):
            reply = await gw.gateway.generate(
                gateway_pb2.GenerateRequest(model=alias, prompt=f"p{i}")
            )
            assert reply.version_id == "ver_s"
        await _wait_route(gw, alias, lambda r: r.release_state == "rolled_back", 10)
        route = gw.routes.get(alias)
        assert route is not None
        decision = route.last_decision
        assert decision.kind == "rollback"
        assert decision.figures["mirrored_requests"] >= decision.figures["requests"] / 2
        assert decision.figures["mirrored_requests"] <= decision.figures["requests"]
        assert route.stable_version_id == "ver_s"
    finally:
        await monitor.stop()
        await gw.stop()
