"""Release rules without I/O: flag rules, the sticky split, mirroring, release specs,
pause, hold and retirement, manual-command guards, replica choice, divergence."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops.inference.v1 import inference_pb2
from ftops_gateway import release_spec, route_rules
from ftops_gateway.chooser import (
    ARM_CANDIDATE,
    ARM_STABLE,
    Caller,
    Target,
    choose,
    mirrors,
    sticky_bucket,
)
from ftops_gateway.endpoints import EndpointPool
from ftops_gateway.shadow import ShadowMirror, divergence
from ftops_runtime.errors import FailedPrecondition, InvalidArgument, NotFound


def _start(**fields: Any) -> gateway_pb2.Route:
    request = gateway_pb2.StartReleaseRequest(alias="bot", candidate_version_id="ver_c", **fields)
    spec = release_spec.from_request(request, "ver_c")
    base = route_rules.set_route(None, "bot", "ver_s")
    return route_rules.start_release(base, spec, "rel_1", now=1000.0)


def _promote(step: int, weight: int, *, final: bool = False, manual: bool = False):  # type: ignore[no-untyped-def]
    return events_pb2.ReleasePromote(
        meta=common_pb2.EventMeta(event_id=f"p{step}{final}{manual}"),
        release_id="rel_1",
        alias="bot",
        candidate_version_id="ver_c",
        stable_version_id="ver_s",
        step_index=step,
        weight=weight,
        final=final,
        manual=manual,
    )


# -- flag rules ---------------------------------------------------------------------------


def test_flag_rules_come_before_weights() -> None:
    flags = [
        events_pb2.FlagRule(name="dogfood", tenants=["acme"]),
        events_pb2.FlagRule(name="beta", users=["u1", "u2"], metadata={"plan": "beta"}),
        events_pb2.FlagRule(name="optout", users=["u9"], arm="stable"),
    ]
    route = _start(flags=flags, steps=[50, 100])
    route.candidate_weight = 0  # weights alone would send nobody to the candidate
    rng = random.Random(1)
    acme = choose(route, rng, Caller(tenant="acme"))
    assert (acme.arm, acme.flag) == (ARM_CANDIDATE, "dogfood")
    # Every condition of a rule must hold.
    assert choose(route, rng, Caller(user="u1")).arm == ARM_STABLE
    beta = choose(route, rng, Caller(user="u1", metadata={"plan": "beta"}))
    assert (beta.arm, beta.flag, beta.version_id) == (ARM_CANDIDATE, "beta", "ver_c")
    route.candidate_weight = 100
    optout = choose(route, rng, Caller(user="u9"))
    assert (optout.arm, optout.flag) == (ARM_STABLE, "optout")
    assert choose(route, rng, Caller(user="u3")).arm == ARM_CANDIDATE


def test_flag_rules_are_validated() -> None:
    with pytest.raises(InvalidArgument, match="no condition"):
        _start(flags=[events_pb2.FlagRule(name="all")])
    with pytest.raises(InvalidArgument, match="arm must be"):
        _start(flags=[events_pb2.FlagRule(tenants=["a"], arm="shadow")])
    route = _start(flags=[events_pb2.FlagRule(tenants=["a"])])
    assert (route.flags[0].name, route.flags[0].arm) == ("#1", "candidate")


# -- sticky split -------------------------------------------------------------------------


def test_sticky_split_keeps_users_and_only_moves_them_forward() -> None:
    route = _start(sticky=True, steps=[10, 30, 60, 100])
    users = [f"user-{i}" for i in range(2000)]
    rng = random.Random(3)
    arms: dict[int, dict[str, str]] = {}
    for weight in (10, 30, 60):
        route.candidate_weight = weight
        arms[weight] = {u: choose(route, rng, Caller(user=u)).arm for u in users}
        share = sum(a == ARM_CANDIDATE for a in arms[weight].values()) / len(users)
        assert abs(share - weight / 100) < 0.04, (weight, share)
        # The same user always lands on the same arm at a given weight.
        assert all(choose(route, rng, Caller(user=u)).arm == arms[weight][u] for u in users[:50])
    for low, high in ((10, 30), (30, 60)):
        moved_back = [u for u in users if arms[low][u] == ARM_CANDIDATE != arms[high][u]]
        assert moved_back == []
    # A session key in the metadata works when there is no user.
    session = Caller(metadata={"session": "user-7"})
    assert choose(route, rng, session).arm == arms[60]["user-7"]
    assert sticky_bucket("bot", "rel_1", "k") == sticky_bucket("bot", "rel_1", "k")


# -- mirroring ----------------------------------------------------------------------------


def test_mirroring_share_and_only_stable_requests() -> None:
    route = _start(strategy=events_pb2.RELEASE_STRATEGY_SHADOW, shadow_percent=30)
    assert (route.candidate_weight, route.shadow_percent, list(route.steps)) == (0, 30, [100])
    rng = random.Random(5)
    stable = choose(route, rng)
    assert stable.arm == ARM_STABLE
    share = sum(mirrors(route, stable, rng) for _ in range(5000)) / 5000
    assert abs(share - 0.3) < 0.03
    route.candidate_weight = 100
    candidate = choose(route, rng)
    assert not mirrors(route, candidate, rng)


# -- release specs ------------------------------------------------------------------------


def test_blue_green_spec_defaults() -> None:
    route = _start(strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN)
    assert (route.candidate_weight, list(route.steps), route.shadow_percent) == (0, [100], 100)
    assert route.hold_seconds == 300
    assert route_rules.weights(route) == {"ver_s": 100}
    explicit = _start(
        strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN, shadow_percent=0, hold_seconds=0
    )
    assert (explicit.shadow_percent, explicit.hold_seconds) == (0, 0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shadow_percent": 101}, "shadow_percent 101"),
        ({"strategy": events_pb2.RELEASE_STRATEGY_BLUE_GREEN, "steps": [50, 100]}, "steps"),
        ({"strategy": events_pb2.RELEASE_STRATEGY_SHADOW, "shadow_percent": 0}, "shadow_percent"),
        ({"hold_seconds": -1}, "hold_seconds"),
        ({"steps": [5, 105]}, "outside 1..100"),
        ({"analysis": events_pb2.AnalysisSettings(alpha=1.5)}, "alpha"),
        ({"strategy": 9}, "strategy"),
    ],
)
def test_bad_release_specs(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _start(**fields)


# -- pause, promotion hold, retirement ----------------------------------------------------


def test_pause_stops_automatic_steps_but_not_manual_or_rollback() -> None:
    route = _start()
    paused = route_rules.set_paused(
        route, "bot", "", True, event_id="e1", reason="investigating", now=1001.0
    )
    assert route_rules.state_of(paused) == "paused"
    assert (paused.last_decision.kind, paused.last_decision.reason) == ("paused", "investigating")
    with pytest.raises(FailedPrecondition, match="already paused"):
        route_rules.set_paused(paused, "bot", "", True, event_id="e2", reason="")
    assert route_rules.apply_promote(paused, _promote(1, 25)) is None
    manual = route_rules.apply_promote(paused, _promote(3, 100, final=True, manual=True))
    assert manual is not None
    assert manual.stable_version_id == "ver_c"
    rollback = events_pb2.ReleaseRollback(
        meta=common_pb2.EventMeta(event_id="r"), release_id="rel_1", alias="bot"
    )
    back = route_rules.apply_rollback(paused, rollback)
    assert back is not None
    assert (route_rules.state_of(back), back.paused) == ("rolled_back", False)
    resumed = route_rules.set_paused(paused, "bot", "", False, event_id="e3", reason="")
    assert route_rules.state_of(resumed) == "running"


def test_final_switch_holds_previous_then_retires_it() -> None:
    route = _start(strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN, hold_seconds=60)
    final = route_rules.apply_promote(route, _promote(0, 100, final=True), now=2000.0)
    assert final is not None
    assert (final.stable_version_id, final.previous_version_id) == ("ver_c", "ver_s")
    assert route_rules.state_of(final) == "promoted"
    assert final.last_decision.final
    assert route_rules.versions_in_use(final) == {"ver_c", "ver_s"}
    assert not route_rules.retire_due(final, 2059.0)
    assert route_rules.retire_due(final, 2060.0)
    retired = route_rules.mark_retired(final, "ver_s")
    assert retired is not None
    assert not route_rules.retire_due(retired, 3000.0)
    assert route_rules.versions_in_use(retired) == {"ver_c"}
    assert route_rules.mark_retired(retired, "ver_s") is None


def test_manual_command_guards() -> None:
    route = _start()
    route_rules.require_running(route, "bot", "rel_1")
    with pytest.raises(FailedPrecondition, match="not the latest release"):
        route_rules.require_running(route, "bot", "rel_0")
    final = route_rules.apply_promote(route, _promote(3, 100, final=True))
    with pytest.raises(FailedPrecondition, match="was promoted"):
        route_rules.require_running(final, "bot", "")
    with pytest.raises(FailedPrecondition, match="has no release"):
        route_rules.require_running(route_rules.set_route(None, "bot", "ver_s"), "bot", "")
    with pytest.raises(NotFound, match="no route"):
        route_rules.require_running(None, "bot", "")


# -- replica choice -----------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _announce(replica: str, **fields: object) -> events_pb2.ReplicaAnnounce:
    values: dict[str, object] = {
        "replica_id": replica,
        "endpoint": f"{replica}:1",
        "serving": True,
        "heartbeat_interval_s": 2.0,
        "reason": "heartbeat",
    }
    values.update(fields)
    return events_pb2.ReplicaAnnounce(**values)  # type: ignore[arg-type]


def test_replicas_from_announcements() -> None:
    clock = _Clock()
    pool = EndpointPool(clock=clock)
    pool.announce(_announce("r1", loaded_versions=["ver_a"]))
    pool.announce(_announce("r2", cached_versions=["ver_a"]))
    pool.announce(_announce("r3"))

    def picked(version: str, exclude: tuple[str, ...] = ()) -> str:
        endpoint = pool.pick(version, exclude=exclude)
        return endpoint.name if endpoint else ""

    assert picked("ver_a") == "r1"
    # Loaded beats cached beats nothing, even when busier.
    pool.add("r1:1").outstanding = 5
    assert picked("ver_a") == "r1"
    assert picked("ver_a", exclude=("r1:1",)) == "r2"
    # Nobody has ver_b: the least busy.
    pool.add("r2:1").outstanding = 1
    assert picked("ver_b") == "r3"
    # Draining or not serving: skipped.
    pool.announce(_announce("r1", loaded_versions=["ver_a"], reason="drain"))
    assert picked("ver_a") == "r2"
    # Silent for more than 3 heartbeat intervals: skipped until heard again.
    clock.now += 7.0
    pool.announce(_announce("r3"))
    assert picked("ver_a") == "r3"
    pool.announce(_announce("r2", cached_versions=["ver_a"]))
    assert picked("ver_a") == "r2"


def test_a_replayed_old_announcement_does_not_revive_a_replica() -> None:
    # A starting gateway reads the last announcement of every replica from the stream: one
    # sent a minute ago by a replica since killed must not count as recent.
    pool = EndpointPool()
    old = _announce("dead", loaded_versions=["ver_a"])
    old.meta.occurred_at.FromSeconds(int(time.time()) - 60)
    pool.announce(old)
    fresh = _announce("alive")
    fresh.meta.occurred_at.GetCurrentTime()
    pool.announce(fresh)
    assert pool.pick("ver_a").name == "alive"  # type: ignore[union-attr]


def test_static_endpoints_stay_usable() -> None:
    pool = EndpointPool(["a:1"])
    pool.mark_loaded("b:2", "ver_x")
    assert pool.pick("ver_x").address == "b:2"  # type: ignore[union-attr]
    assert pool.pick("ver_y").address == "a:1"  # type: ignore[union-attr]


# -- divergence ---------------------------------------------------------------------------


def test_divergence() -> None:
    assert divergence("the cat sat", "the cat sat") == 0.0
    assert divergence("", "") == 0.0
    assert divergence("a b c d", "w x y z") == 1.0
    assert divergence("a b c d", "a b c e") == pytest.approx(0.25)


def test_manual_next_step() -> None:
    route = _start(steps=[10, 50, 100])
    assert route_rules.next_step(route, one=False) == (2, 100, True)
    assert route_rules.next_step(route, one=True) == (1, 50, False)
    route.step_index = 1
    assert route_rules.next_step(route, one=True) == (2, 100, True)
    blue_green = _start(strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN)
    assert route_rules.next_step(blue_green, one=True) == (0, 100, True)


class _Reporter:
    def __init__(self) -> None:
        self.results: list[events_pb2.RequestResult] = []

    def record(self, result: events_pb2.RequestResult) -> None:
        self.results.append(result)


class _SlowCandidate:
    """Stands in for the Forwarder: answers once released, or fails."""

    def __init__(self, fail: bool = False) -> None:
        self.release = asyncio.Event()
        self.fail = fail

    async def generate(self, request: Any, attempt: Any = None) -> Any:
        await self.release.wait()
        if self.fail:
            raise RuntimeError("candidate broke")
        return inference_pb2.GenerateResponse(text="the dog sat", completion_tokens=3)


async def test_mirrors_never_queue_and_report_divergence() -> None:
    forwarder, reporter = _SlowCandidate(), _Reporter()
    shadow = ShadowMirror(forwarder, reporter, max_in_flight=1)  # type: ignore[arg-type]
    target = Target("ver_c", ARM_CANDIDATE, "bot", "rel_1")
    request = gateway_pb2.GenerateRequest(model="bot", prompt="p", tenant="acme")
    first = shadow.start(request, "req-1", target)
    assert first is not None
    assert shadow.start(request, "req-2", target) is None  # full: dropped, not queued
    assert shadow.dropped == 1
    first.finish("the cat sat")
    forwarder.release.set()
    await shadow.close_when_idle()
    [result] = reporter.results
    assert (result.arm, result.shadow, result.shadow_of, result.status) == (
        "shadow",
        True,
        "req-1",
        "OK",
    )
    assert result.divergence == pytest.approx(1 / 3)
    assert (result.release_id, result.tenant) == ("rel_1", "acme")

    failing = ShadowMirror(_SlowCandidate(fail=True), reporter)  # type: ignore[arg-type]
    failing._forwarder.release.set()  # type: ignore[attr-defined]
    mirror = failing.start(request, "req-3", target)
    assert mirror is not None
    mirror.finish("stable text")
    await failing.close_when_idle()
    assert (reporter.results[-1].status, reporter.results[-1].divergence) == ("INTERNAL", -1.0)


def test_versions_nothing_routes_to_are_queued_for_retirement() -> None:
    rollback = events_pb2.ReleaseRollback(
        meta=common_pb2.EventMeta(event_id="r"), release_id="rel_1", alias="bot"
    )
    back = route_rules.apply_rollback(_start(), rollback)
    assert back is not None
    assert list(back.retire_pending) == ["ver_c"]
    # Released again: no longer to be retired.
    again = route_rules.start_release(
        back,
        release_spec.from_request(
            gateway_pb2.StartReleaseRequest(alias="bot", candidate_version_id="ver_c"), "ver_c"
        ),
        "rel_2",
    )
    assert list(again.retire_pending) == []
    assert route_rules.retired_pending(back, "ver_c").retire_pending == []  # type: ignore[union-attr]
    assert route_rules.retired_pending(back, "ver_x") is None

    # A second switch while the first one's old version is still held supersedes the hold.
    first = route_rules.apply_promote(_start(), _promote(3, 100, final=True), now=10.0)
    assert first is not None
    assert (first.previous_version_id, list(first.retire_pending)) == ("ver_s", [])
    spec = release_spec.from_request(
        gateway_pb2.StartReleaseRequest(alias="bot", candidate_version_id="ver_d"), "ver_d"
    )
    second = route_rules.start_release(first, spec, "rel_2", now=20.0)
    promote = _promote(3, 100, final=True)
    promote.release_id, promote.candidate_version_id = "rel_2", "ver_d"
    switched = route_rules.apply_promote(second, promote, now=30.0)
    assert switched is not None
    assert (switched.stable_version_id, switched.previous_version_id) == ("ver_d", "ver_c")
    assert list(switched.retire_pending) == ["ver_s"]

    # Reverting a promotion retires the version it had promoted.
    revert = events_pb2.ReleaseRollback(
        meta=common_pb2.EventMeta(event_id="rv"),
        release_id="rel_2",
        alias="bot",
        stable_version_id="ver_c",
        candidate_version_id="ver_d",
    )
    reverted = route_rules.apply_rollback(switched, revert)
    assert reverted is not None
    assert (reverted.stable_version_id, list(reverted.retire_pending)) == (
        "ver_c",
        ["ver_s", "ver_d"],
    )

    # SetRoute over a running release retires its candidate.
    replaced = route_rules.set_route(_start(), "bot", "ver_n")
    assert list(replaced.retire_pending) == ["ver_c"]


# -- the release's whole state on route.changed (the gateway is its only writer) ----------


def test_paused_release_says_paused_on_the_route_and_in_its_snapshot() -> None:
    route = _start(steps=[5, 50, 100])
    assert route_rules.snapshot(route).state == "running"
    paused = route_rules.set_paused(
        route, "bot", "", True, event_id="e-pause", reason="look", now=1010.0
    )
    assert (paused.release_state, route_rules.state_of(paused)) == ("paused", "paused")
    snap = route_rules.snapshot(paused)
    assert (snap.state, snap.change.kind, snap.change.event_id) == ("paused", "paused", "e-pause")
    # The step's evidence window survives a pause; a resume starts the step over.
    assert snap.step_started_at.ToNanoseconds() == 1000 * 10**9
    resumed = route_rules.set_paused(
        paused, "bot", "", False, event_id="e-resume", reason="go", now=1020.0
    )
    snap = route_rules.snapshot(resumed)
    assert (resumed.release_state, snap.state, snap.change.kind) == (
        "running",
        "running",
        "resumed",
    )
    assert snap.step_started_at.ToNanoseconds() == 1020 * 10**9


def test_snapshot_follows_each_step_and_the_end() -> None:
    route = _start(steps=[5, 50, 100])
    snap = route_rules.snapshot(route)
    assert (snap.release_id, snap.candidate_weight, list(snap.steps)) == ("rel_1", 5, [5, 50, 100])
    assert (snap.stable_version_id, snap.candidate_version_id) == ("ver_s", "ver_c")
    assert snap.change.kind == "started"
    step = route_rules.apply_promote(route, _promote(1, 50), now=1005.0)
    assert step is not None
    snap = route_rules.snapshot(step)
    assert (snap.state, snap.step_index, snap.candidate_weight) == ("running", 1, 50)
    assert snap.step_started_at.ToNanoseconds() == 1005 * 10**9
    assert (snap.change.kind, snap.change.event_id) == ("promote", "p1FalseFalse")
    final = route_rules.apply_promote(step, _promote(2, 100, final=True), now=1010.0)
    assert final is not None
    snap = route_rules.snapshot(final)
    # The versions the release started with stay in its snapshot after it ended.
    assert (snap.state, snap.candidate_weight, snap.candidate_version_id) == (
        "promoted",
        0,
        "ver_c",
    )
    assert not snap.HasField("step_started_at")
    replaced = route_rules.set_route(
        _start(steps=[5, 100]), "bot", "ver_x", now=1030.0, event_id="e-set"
    )
    snap = route_rules.snapshot(replaced)
    assert (snap.state, snap.change.kind, snap.change.event_id) == ("replaced", "replaced", "e-set")
    assert route_rules.snapshot(route_rules.set_route(None, "new", "ver_s")).release_id == ""
