"""The gateway's release API over real gRPC, Redis and NATS (fake registry and inference):
commands and their events, conflicting commands, watch, validation, blue-green hold and
retirement across two replicas."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import grpc
import pytest
from test_gateway_service import (  # type: ignore[import-not-found]
    Fakes,
    _alias,
    _collect,
    _gateway,
    _settings,
    _until,
    bus,
    fakes,
)

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.registry.v1 import registry_pb2
from ftops_devstack.servers import start_redis
from ftops_gateway.service import GatewayService
from ftops_runtime.bus import EventBus
from ftops_runtime.client import channel
from ftops_runtime.events import (
    ADAPTER_RETIRED,
    METRICS_REQUESTS,
    RELEASE_PAUSED,
    RELEASE_PROMOTE,
    RELEASE_RESUMED,
    RELEASE_ROLLBACK,
    new_meta,
)

pytestmark = pytest.mark.integration
__all__ = ["bus", "fakes"]  # fixtures shared with test_gateway_service

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def _code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


def _cmd(alias: str, **fields: Any) -> gateway_pb2.ReleaseCommandRequest:
    return gateway_pb2.ReleaseCommandRequest(alias=alias, **fields)


async def test_pause_resume_promote_and_revert_publish_their_events(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    paused_events = await _collect(bus, RELEASE_PAUSED)
    resumed_events = await _collect(bus, RELEASE_RESUMED)
    promotes = await _collect(bus, RELEASE_PROMOTE)
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            route = await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c")
            )
            release = await stub.GetRelease(gateway_pb2.GetReleaseRequest(alias=alias))
            assert (release.state, release.route.release_id) == ("running", route.release_id)
            assert release.route.last_decision.kind == "started"

            paused = await stub.PauseRelease(_cmd(alias, reason="looking at p99"))
            assert (paused.state, paused.route.candidate_weight) == ("paused", 5)
            event = await paused_events.wait_for(lambda e: e.alias == alias)
            assert (event.release_id, event.reason) == (route.release_id, "looking at p99")
            code, details = await _code_of(stub.PauseRelease(_cmd(alias)))
            assert (code, "already paused" in details) == (FAILED_PRECONDITION, True)

            # An automatic step that arrives while paused is not applied.
            step = events_pb2.ReleasePromote(
                meta=new_meta("monitor", "t"),
                release_id=route.release_id,
                alias=alias,
                candidate_version_id="ver_c",
                stable_version_id="ver_s",
                step_index=1,
                weight=25,
            )
            await gw.releases.on_promote(step, None)  # type: ignore[arg-type]
            assert (await gw.store.get(alias)).candidate_weight == 5  # type: ignore[union-attr]

            resumed = await stub.ResumeRelease(_cmd(alias))
            assert resumed.state == "running"
            await resumed_events.wait_for(lambda e: e.alias == alias)

            promoted = await stub.PromoteRelease(_cmd(alias, release_id=route.release_id))
            assert promoted.state == "promoted"
            assert (promoted.route.stable_version_id, promoted.route.previous_version_id) == (
                "ver_c",
                "ver_s",
            )
            published = await promotes.wait_for(lambda e: e.alias == alias)
            assert (published.final, published.manual, published.weight) == (True, True, 100)
            # The gateway's own decision consumer gets that event too: already applied.
            revision = promoted.route.revision
            await gw.releases.on_promote(published, None)  # type: ignore[arg-type]
            assert (await gw.store.get(alias)).revision == revision  # type: ignore[union-attr]

            code, details = await _code_of(stub.RollbackRelease(_cmd(alias)))
            assert (code, "was promoted" in details) == (FAILED_PRECONDITION, True)
            reverted = await stub.RollbackRelease(_cmd(alias, revert_promotion=True))
            assert (reverted.state, reverted.route.stable_version_id) == ("rolled_back", "ver_s")
            back = await rollbacks.wait_for(lambda e: e.alias == alias)
            assert (back.stable_version_id, back.candidate_version_id, back.manual) == (
                "ver_s",
                "ver_c",
                True,
            )
            reply = await stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt="x"))
            assert reply.version_id == "ver_s"
    finally:
        await gw.stop()


async def test_get_and_list_combine_redis_with_registry_history(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias, other = _alias(), _alias()
    old = registry_pb2.Release(
        release_id="rel_old",
        alias=alias,
        stable_version_id="ver_s",
        candidate_version_id="ver_bad",
        strategy="blue_green",
        state="rolled_back",
        history=[registry_pb2.ReleaseDecision(kind="rollback", reason="error rate 0.31")],
    )
    fakes.registry_impl.releases["rel_old"] = old
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            for a in (alias, other):
                await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=a, version_id="ver_s"))
                await stub.StartRelease(
                    gateway_pb2.StartReleaseRequest(alias=a, candidate_version_id="ver_c")
                )
            listed = await stub.ListReleases(gateway_pb2.ListReleasesRequest(alias=alias))
            assert [(r.route.release_id[:4], r.state) for r in listed.releases] == [
                ("rel_", "running"),
                ("rel_old"[:4], "rolled_back"),
            ]
            assert listed.releases[1].route.strategy == events_pb2.RELEASE_STRATEGY_BLUE_GREEN
            assert listed.releases[1].history[0].reason == "error rate 0.31"
            active = await stub.ListReleases(gateway_pb2.ListReleasesRequest())
            assert {alias, other} <= {r.route.alias for r in active.releases}
            assert all(r.state == "running" for r in active.releases)
            by_id = await stub.GetRelease(gateway_pb2.GetReleaseRequest(release_id="rel_old"))
            assert (by_id.state, by_id.route.release_candidate_version_id) == (
                "rolled_back",
                "ver_bad",
            )
            code, _ = await _code_of(stub.GetRelease(gateway_pb2.GetReleaseRequest(alias="nope")))
            assert code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.WatchRelease(gateway_pb2.WatchReleaseRequest(alias="nope")):
                    pass
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            code, _ = await _code_of(
                stub.GetRelease(gateway_pb2.GetReleaseRequest(release_id="rel_ghost"))
            )
            assert code == grpc.StatusCode.NOT_FOUND
    finally:
        await gw.stop()


async def test_promote_while_rolling_back_exactly_one_wins(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    # Two replicas, each command on a different one: the conflict is decided in Redis.
    gws: list[GatewayService] = [
        await _gateway(_settings(nats_url, redis_url, fakes)) for _ in range(2)
    ]
    try:
        async with channel(gws[0].address) as ch0, channel(gws[1].address) as ch1:
            s0 = gateway_pb2_grpc.GatewayServiceStub(ch0)
            s1 = gateway_pb2_grpc.GatewayServiceStub(ch1)
            winners = set()
            for _ in range(6):
                alias = _alias()
                await s0.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
                await s0.StartRelease(
                    gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c")
                )
                results = await asyncio.gather(
                    s0.PromoteRelease(_cmd(alias)),
                    s1.RollbackRelease(_cmd(alias)),
                    return_exceptions=True,
                )
                ok = [r for r in results if isinstance(r, gateway_pb2.Release)]
                failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
                assert len(ok) == 1, results
                assert [f.code() for f in failed] == [FAILED_PRECONDITION]
                route = await gws[1].store.get(alias)
                assert route is not None
                winners.add(ok[0].state)
                expected = "ver_c" if ok[0].state == "promoted" else "ver_s"
                assert (route.stable_version_id, route.candidate_version_id) == (expected, "")
                assert route.release_state == ok[0].state
    finally:
        for gw in gws:
            await gw.stop()


async def test_watch_streams_every_step_until_the_release_ends(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            route = await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=alias, candidate_version_id="ver_c", steps=[10, 50, 100]
                )
            )
            seen: list[gateway_pb2.Release] = []
            first = asyncio.Event()

            async def watch() -> None:
                async for release in stub.WatchRelease(
                    gateway_pb2.WatchReleaseRequest(alias=alias)
                ):
                    seen.append(release)
                    first.set()

            watcher = asyncio.create_task(watch())
            await asyncio.wait_for(first.wait(), 5)
            for step, weight, final in ((1, 50, False), (2, 100, True)):
                await bus.publish(
                    RELEASE_PROMOTE,
                    events_pb2.ReleasePromote(
                        meta=new_meta("monitor", "t"),
                        release_id=route.release_id,
                        alias=alias,
                        candidate_version_id="ver_c",
                        stable_version_id="ver_s",
                        step_index=step,
                        weight=weight,
                        final=final,
                        reason="error rate 0.000 <= 0.05 over 40 requests",
                        figures={"error_rate": 0.0, "requests": 40},
                    ),
                )
            await asyncio.wait_for(watcher, 10)  # the stream ends with the release
        assert [(r.state, r.route.candidate_weight) for r in seen] == [
            ("running", 10),
            ("running", 50),
            ("promoted", 0),
        ]
        assert seen[1].route.last_decision.figures["requests"] == 40
        assert seen[2].route.last_decision.final
    finally:
        await gw.stop()


async def test_bad_release_requests_change_nothing(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            code, details = await _code_of(stub.PauseRelease(_cmd(alias)))
            assert (code, alias in details) == (grpc.StatusCode.NOT_FOUND, True)
            before = await stub.SetRoute(
                gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s")
            )
            bad: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
                ({"candidate_version_id": "ver_other"}, FAILED_PRECONDITION, "base model"),
                ({"candidate_version_id": "ver_zzz"}, grpc.StatusCode.NOT_FOUND, "ver_zzz"),
                ({"candidate_version_id": "ver_rej"}, FAILED_PRECONDITION, "evaluation gate"),
                (
                    {"candidate_version_id": "ver_c", "shadow_percent": 150},
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "shadow_percent",
                ),
                (
                    {"candidate_version_id": "ver_c", "steps": [20, 10]},
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "increasing",
                ),
                (
                    {"candidate_version_id": "ver_c", "steps": [50, 101]},
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "outside",
                ),
                (
                    {
                        "candidate_version_id": "ver_c",
                        "flags": [events_pb2.FlagRule(name="everyone")],
                    },
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "no condition",
                ),
            ]
            for fields, code_wanted, text in bad:
                code, details = await _code_of(
                    stub.StartRelease(gateway_pb2.StartReleaseRequest(alias=alias, **fields))
                )
                assert (code, text in details) == (code_wanted, True), (fields, details)
            for call in (stub.PromoteRelease(_cmd(alias)), stub.RollbackRelease(_cmd(alias))):
                code, details = await _code_of(call)
                assert (code, "no release" in details) == (FAILED_PRECONDITION, True)
            after = await gw.store.get(alias)
            assert after == before
    finally:
        await gw.stop()


async def test_blue_green_mirrors_then_switches_and_retires_once(
    nats_url: str, fakes: Fakes, bus: EventBus
) -> None:
    # A Redis of its own: other tests' aliases still routing to ver_s would keep it in use.
    redis_server = start_redis()
    redis_url = redis_server.url
    metrics = await _collect(bus, METRICS_REQUESTS)
    retired = await _collect(bus, ADAPTER_RETIRED)
    durable = f"gwrel-{time.monotonic_ns()}"
    # Retirement is driven by hand here (run_once), so the loops stay out of the way.
    gws: list[GatewayService] = [
        await _gateway(
            _settings(nats_url, redis_url, fakes, releases_durable=durable, retire_interval_s=60)
        )
        for _ in range(2)
    ]
    alias = _alias()
    try:
        async with channel(gws[0].address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            await stub.SetRoute(gateway_pb2.SetRouteRequest(alias=alias, version_id="ver_s"))
            route = await stub.StartRelease(
                gateway_pb2.StartReleaseRequest(
                    alias=alias,
                    candidate_version_id="ver_c",
                    strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN,
                    hold_seconds=30,
                )
            )
            assert (route.candidate_weight, route.shadow_percent) == (0, 100)
            for i in range(10):
                reply = await stub.Generate(
                    gateway_pb2.GenerateRequest(model=alias, prompt=f"p{i}")
                )
                assert (reply.arm, reply.version_id) == ("stable", "ver_s")

            def shadows() -> list[events_pb2.RequestResult]:
                return [
                    r for b in metrics.events for r in b.results if r.alias == alias and r.shadow
                ]

            await _until(lambda: len(shadows()) == 10)
            for result in shadows():
                assert (result.arm, result.version_id, result.status) == ("shadow", "ver_c", "OK")
                assert result.shadow_of
                assert not result.shadow_of.endswith("-shadow")
                # "[ver_s] pN" against "[ver_c] pN": one word of two differs.
                assert result.divergence == pytest.approx(0.5)

            # The monitor's verdict: the final promotion switches everything at once.
            await bus.publish(
                RELEASE_PROMOTE,
                events_pb2.ReleasePromote(
                    meta=new_meta("monitor", "t"),
                    release_id=route.release_id,
                    alias=alias,
                    candidate_version_id="ver_c",
                    stable_version_id="ver_s",
                    step_index=0,
                    weight=100,
                    final=True,
                ),
            )
            await _until(
                lambda: all(
                    (r := gw.routes.get(alias)) is not None and r.stable_version_id == "ver_c"
                    for gw in gws
                )
            )
            reply = await stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt="x"))
            assert reply.version_id == "ver_c"
            held = gws[0].routes.get(alias)
            assert held is not None
            assert (held.previous_version_id, held.previous_retired) == ("ver_s", False)

            now = time.time()
            assert [await gw.retirer.run_once(now) for gw in gws] == [0, 0]  # still held
            later = now + 31
            done = await asyncio.gather(*(gw.retirer.run_once(later) for gw in gws))
            assert sorted(done) == [0, 1]
            for gw in gws:  # a later pass on either replica retires nothing more
                assert await gw.retirer.run_once(later + 60) == 0
            event = await retired.wait_for(lambda e: e.release_id == route.release_id)
            assert event.version_id == "ver_s"
            assert [e.version_id for e in retired.events if e.release_id == route.release_id] == [
                "ver_s"
            ]
            stored = await gws[1].store.get(alias)
            assert stored is not None
            assert stored.previous_retired
    finally:
        for gw in gws:
            await gw.stop()
        redis_server.stop()


async def test_decisions_wait_for_redis_and_commands_say_unavailable(
    nats_url: str, fakes: Fakes, bus: EventBus
) -> None:
    redis_server = start_redis()
    assert redis_server.proc is not None
    gw: GatewayService = await _gateway(
        _settings(nats_url, redis_server.url, fakes, redis_timeout_s=0.3, route_refresh_s=0.2)
    )
    alias = _alias()
    frozen = False
    try:
        await gw.releases.set_route(alias, "ver_s")
        route = await gw.releases.start_release(
            gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c")
        )
        redis_server.proc.send_signal(signal.SIGSTOP)  # unreachable: connections hang
        frozen = True
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
        async with channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            code, details = await _code_of(stub.PauseRelease(_cmd(alias)))
            assert (code, "Redis" in details) == (grpc.StatusCode.UNAVAILABLE, True)
            # Requests keep flowing on the last known table meanwhile.
            for _ in range(3):
                reply = await stub.Generate(gateway_pb2.GenerateRequest(model=alias, prompt="x"))
                assert reply.version_id in ("ver_s", "ver_c")
        cached = gw.routes.get(alias)
        assert cached is not None
        assert cached.candidate_weight == 5
        redis_server.proc.send_signal(signal.SIGCONT)
        frozen = False
        # The decision that arrived during the outage is applied once Redis is back.
        await _until(
            lambda: (r := gw.routes.get(alias)) is not None and r.candidate_weight == 25, 15
        )
    finally:
        if frozen:
            redis_server.proc.send_signal(signal.SIGCONT)
        await gw.stop()
        redis_server.stop()


async def test_set_route_ends_a_running_release_and_says_so(
    nats_url: str, redis_url: str, fakes: Fakes, bus: EventBus
) -> None:
    rollbacks = await _collect(bus, RELEASE_ROLLBACK)
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        await gw.releases.set_route(alias, "ver_s")
        started = await gw.releases.start_release(
            gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c")
        )
        route = await gw.releases.set_route(alias, "ver_slow")
        assert (route.release_state, route.candidate_version_id) == ("replaced", "")
        event = await rollbacks.wait_for(lambda e: e.alias == alias)
        assert (event.release_id, event.stable_version_id) == (started.release_id, "ver_slow")
        assert "replaced" in event.reason
        # Its own copy of that event changes nothing.
        await gw.releases.on_rollback(event, None)  # type: ignore[arg-type]
        assert (await gw.store.get(alias)) == route
    finally:
        await gw.stop()


async def test_a_version_another_alias_routes_to_is_not_retired(
    nats_url: str, fakes: Fakes, bus: EventBus
) -> None:
    redis_server = start_redis()
    retired = await _collect(bus, ADAPTER_RETIRED)
    gw: GatewayService = await _gateway(
        _settings(nats_url, redis_server.url, fakes, retire_interval_s=60)
    )
    switched, other = _alias(), _alias()
    try:
        await gw.releases.set_route(other, "ver_s")
        await gw.releases.set_route(switched, "ver_s")
        started = await gw.releases.start_release(
            gateway_pb2.StartReleaseRequest(
                alias=switched,
                candidate_version_id="ver_c",
                strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN,
                hold_seconds=10,
            )
        )
        await gw.releases.promote(_cmd(switched))
        assert await gw.retirer.run_once(time.time() + 11) == 0
        route = await gw.store.get(switched)
        assert route is not None
        # Settled without an event: ver_s still serves the other alias.
        assert (route.previous_version_id, route.previous_retired) == ("ver_s", True)
        assert [e for e in retired.events if e.release_id == started.release_id] == []
    finally:
        await gw.stop()
        redis_server.stop()


async def test_a_rolled_back_candidate_is_retired(
    nats_url: str, fakes: Fakes, bus: EventBus
) -> None:
    redis_server = start_redis()  # no other test's alias routes to ver_c here
    retired = await _collect(bus, ADAPTER_RETIRED)
    gw: GatewayService = await _gateway(
        _settings(nats_url, redis_server.url, fakes, retire_interval_s=60)
    )
    alias = _alias()
    try:
        await gw.releases.set_route(alias, "ver_s")
        started = await gw.releases.start_release(
            gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c")
        )
        back = await gw.releases.rollback(_cmd(alias, reason="bad answers"))
        assert list(back.route.retire_pending) == ["ver_c"]
        assert await gw.retirer.run_once(time.time()) == 1
        assert await gw.retirer.run_once(time.time()) == 0
        event = await retired.wait_for(lambda e: e.release_id == started.release_id)
        assert event.version_id == "ver_c"
        assert "no longer routes" in event.reason
        route = await gw.store.get(alias)
        assert route is not None
        assert list(route.retire_pending) == []
    finally:
        await gw.stop()
        redis_server.stop()
