"""Canary "mirrored evidence": which stable requests are also sent to the candidate at
which step, the release setting's defaults and validation, and the request path's plan."""

from __future__ import annotations

import random
from typing import Any, cast

import pytest

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_cli.releases import _route_fields, release_fields
from ftops_gateway import release_spec, route_rules
from ftops_gateway.chooser import (
    ARM_CANDIDATE,
    ARM_STABLE,
    Caller,
    Target,
    choose,
    evidence_mirror_share,
    mirror_share,
    mirrors,
)
from ftops_gateway.gateway import Gateway
from ftops_gateway.route_cache import RouteCache
from ftops_runtime.errors import InvalidArgument

BLUE_GREEN = events_pb2.RELEASE_STRATEGY_BLUE_GREEN
SHADOW = events_pb2.RELEASE_STRATEGY_SHADOW


def _start(**fields: Any) -> gateway_pb2.Route:
    request = gateway_pb2.StartReleaseRequest(alias="bot", candidate_version_id="ver_c", **fields)
    spec = release_spec.from_request(request, "ver_c")
    base = route_rules.set_route(None, "bot", "ver_s")
    return route_rules.start_release(base, spec, "rel_1", now=1000.0)


def _promote(route: gateway_pb2.Route, step: int, weight: int) -> gateway_pb2.Route:
    event = events_pb2.ReleasePromote(
        meta=common_pb2.EventMeta(event_id=f"p{step}"),
        release_id="rel_1",
        alias="bot",
        candidate_version_id="ver_c",
        stable_version_id="ver_s",
        step_index=step,
        weight=weight,
    )
    promoted = route_rules.apply_promote(route, event, now=1001.0)
    assert promoted is not None
    return promoted


class _Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


# -- the setting ----------------------------------------------------------------------------


def test_canary_defaults_to_the_evidence_share_and_zero_turns_it_off() -> None:
    route = _start()
    assert (route.candidate_weight, route.evidence_mirror_percent) == (5, 20)
    assert route.evidence_mirror_percent == release_spec.DEFAULT_EVIDENCE_MIRROR_PERCENT
    assert _start(evidence_mirror_percent=0).evidence_mirror_percent == 0
    assert _start(evidence_mirror_percent=100).evidence_mirror_percent == 100
    # Blue-green and shadow judge shadow_percent of the stable requests already.
    assert _start(strategy=BLUE_GREEN).evidence_mirror_percent == 0
    assert _start(strategy=SHADOW, evidence_mirror_percent=0).evidence_mirror_percent == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"evidence_mirror_percent": 101}, "evidence_mirror_percent 101 is outside 0..100"),
        ({"strategy": BLUE_GREEN, "evidence_mirror_percent": 20}, "canary releases only"),
        ({"strategy": SHADOW, "evidence_mirror_percent": 5}, "canary releases only"),
    ],
)
def test_invalid_evidence_mirror_percent(fields: dict[str, Any], message: str) -> None:
    request = gateway_pb2.StartReleaseRequest(alias="bot", candidate_version_id="ver_c", **fields)
    with pytest.raises(InvalidArgument, match=message):
        release_spec.from_request(request, "ver_c")


# -- who is mirrored at which step ------------------------------------------------------------


def test_share_tops_up_small_steps_and_stops_at_the_evidence_share() -> None:
    route = _start()  # steps 5, 25, 50, 100; evidence 20%
    # 5% own + 95% x p mirrored = 20%: p = 15/95 of the stable requests.
    assert evidence_mirror_share(route) == pytest.approx(100 * 15 / 95)
    assert mirror_share(route) == pytest.approx(100 * 15 / 95)
    # From 25% on the step's own traffic is evidence enough.
    later = _promote(route, 1, 25)
    assert evidence_mirror_share(later) == 0.0
    assert mirror_share(later) == 0.0
    # A step exactly at the share mirrors nothing either.
    at_share = _start(steps=[20, 100])
    assert evidence_mirror_share(at_share) == 0.0
    wide = _start(evidence_mirror_percent=50)
    assert evidence_mirror_share(_promote(wide, 1, 25)) == pytest.approx(100 * 25 / 75)


def test_no_mirror_when_off_paused_ended_or_not_canary() -> None:
    assert evidence_mirror_share(_start(evidence_mirror_percent=0)) == 0.0
    paused = route_rules.set_paused(
        _start(), "bot", "rel_1", True, event_id="e", reason="look", now=1001.0
    )
    assert mirror_share(paused) == 0.0
    rollback = events_pb2.ReleaseRollback(
        meta=common_pb2.EventMeta(event_id="r"),
        release_id="rel_1",
        alias="bot",
        candidate_version_id="ver_c",
        stable_version_id="ver_s",
    )
    ended = route_rules.apply_rollback(_start(), rollback, now=1001.0)
    assert ended is not None
    assert ended.evidence_mirror_percent == 20
    assert mirror_share(ended) == 0.0
    # A route that claims a share on another strategy still mirrors only shadow_percent.
    blue_green = _start(strategy=BLUE_GREEN, shadow_percent=30)
    blue_green.evidence_mirror_percent = 80
    assert mirror_share(blue_green) == 30.0


def test_larger_of_shadow_percent_and_evidence_share() -> None:
    assert mirror_share(_start(shadow_percent=50)) == 50.0
    assert mirror_share(_start(shadow_percent=10)) == pytest.approx(100 * 15 / 95)


def test_only_stable_arm_requests_are_mirrored_and_the_decision_is_the_rng() -> None:
    route = _start()
    stable = Target("ver_s", ARM_STABLE, "bot", "rel_1")
    candidate = Target("ver_c", ARM_CANDIDATE, "bot", "rel_1")
    assert mirrors(route, stable, _Fixed(0.1578))
    assert not mirrors(route, stable, _Fixed(0.1579))
    assert not mirrors(route, candidate, _Fixed(0.0))
    # Flag-routed stable requests are stable requests like any other.
    flagged = Target("ver_s", ARM_STABLE, "bot", "rel_1", flag="optout")
    assert mirrors(route, flagged, _Fixed(0.0))


def test_candidate_evidence_is_the_share_while_users_see_the_weight() -> None:
    route = _start()
    rng = random.Random(42)
    n = 20_000
    answered = mirrored = 0
    for _ in range(n):
        target = choose(route, rng, Caller())
        answered += target.arm == ARM_CANDIDATE
        mirrored += mirrors(route, target, rng)
    # Binomial std at n=20000 is < 0.3 points; 1.5 points is > 5 sigma.
    assert abs(answered / n - 0.05) < 0.015
    assert abs((answered + mirrored) / n - 0.20) < 0.015


# -- the request path's plan ------------------------------------------------------------------


class _Routes:
    def __init__(self, route: gateway_pb2.Route) -> None:
        self.route = route

    async def lookup(self, alias: str) -> gateway_pb2.Route | None:
        return self.route if alias == self.route.alias else None


def _gateway(route: gateway_pb2.Route, rng: Any) -> Gateway:
    return Gateway(
        cast(RouteCache, _Routes(route)),
        versions=None,  # type: ignore[arg-type]
        forwarder=None,  # type: ignore[arg-type]
        reporter=None,  # type: ignore[arg-type]
        rng=rng,
        shadow=cast(Any, object()),
    )


async def test_plan_mirrors_stable_requests_to_the_candidate_at_the_first_step_only() -> None:
    route = _start()
    # 0.5: stable arm (>= 5%), and 50% >= 15.8%: not mirrored.
    plan = await _gateway(route, _Fixed(0.5)).plan("bot")
    assert (plan.target.arm, plan.mirror_to) == (ARM_STABLE, None)
    # 0.1: stable arm (>= 5%) and 10% < 15.8%: mirrored to the candidate.
    plan = await _gateway(route, _Fixed(0.1)).plan("bot")
    assert plan.target == Target("ver_s", ARM_STABLE, "bot", "rel_1")
    assert plan.mirror_to == Target("ver_c", ARM_CANDIDATE, "bot", "rel_1")
    # 0.01: the candidate's own request, with stable as fallback and no mirror.
    plan = await _gateway(route, _Fixed(0.01)).plan("bot")
    assert (plan.target.arm, plan.mirror_to) == (ARM_CANDIDATE, None)
    assert plan.fallback is not None
    assert plan.fallback.arm == ARM_STABLE
    # At the 25% step nothing is mirrored any more.
    plan = await _gateway(_promote(route, 1, 25), _Fixed(0.3)).plan("bot")
    assert (plan.target.arm, plan.mirror_to) == (ARM_STABLE, None)
    # Traffic split announced on route.changed stays the user-facing one.
    assert route_rules.weights(route) == {"ver_c": 5, "ver_s": 95}


# -- how the CLI shows it ----------------------------------------------------------------------


def test_cli_route_view_says_what_the_analysis_sees() -> None:
    route = _start()
    assert dict(_route_fields(route))["evidence"] == (
        "20% (5% answered + 15% mirrored from stable)"
    )
    release = gateway_pb2.Release(route=_promote(route, 1, 25), state="running")
    assert dict(release_fields(release))["evidence"] == (
        "20% (the step's own traffic; nothing mirrored)"
    )
    paused = route_rules.set_paused(
        route, "bot", "rel_1", True, event_id="e", reason="look", now=1001.0
    )
    assert dict(_route_fields(paused))["evidence"] == "20% (not mirrored while paused)"
    assert "evidence" not in dict(_route_fields(_start(evidence_mirror_percent=0)))
