"""Gateway pure logic: weighted choice, route transitions, endpoint choice."""

from __future__ import annotations

import random
from typing import Any

import pytest

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_gateway import release_spec, route_rules
from ftops_gateway.chooser import ARM_CANDIDATE, ARM_STABLE, choose
from ftops_gateway.endpoints import EndpointPool
from ftops_runtime.errors import FailedPrecondition, InvalidArgument


def _route(weight: int = 0, candidate: str = "ver_c") -> gateway_pb2.Route:
    return gateway_pb2.Route(
        alias="bot",
        stable_version_id="ver_s",
        candidate_version_id=candidate if weight else "",
        candidate_weight=weight,
        release_id="rel_1" if weight else "",
    )


@pytest.mark.parametrize("weight", [5, 25, 50])
def test_weighted_choice_matches_weight(weight: int) -> None:
    rng = random.Random(1234)
    n = 20_000
    hits = sum(choose(_route(weight), rng).arm == ARM_CANDIDATE for _ in range(n))
    share = hits / n
    # Binomial std at n=20000 is <0.4 percentage points; 1.5 points is > 3.5 sigma.
    assert abs(share - weight / 100) < 0.015


def test_choice_edges() -> None:
    rng = random.Random(7)
    assert {choose(_route(0), rng).arm for _ in range(200)} == {ARM_STABLE}
    assert {choose(_route(100), rng).arm for _ in range(200)} == {ARM_CANDIDATE}
    target = choose(_route(100), rng)
    assert (target.version_id, target.alias, target.release_id) == ("ver_c", "bot", "rel_1")


class _Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_choice_is_a_pure_function_of_rng() -> None:
    assert choose(_route(25), _Fixed(0.2499)).arm == ARM_CANDIDATE
    assert choose(_route(25), _Fixed(0.25)).arm == ARM_STABLE


def _meta(event_id: str) -> common_pb2.EventMeta:
    return common_pb2.EventMeta(event_id=event_id)


def _promote(
    step: int, weight: int, final: bool = False, release: str = "rel_1"
) -> events_pb2.ReleasePromote:
    return events_pb2.ReleasePromote(
        meta=_meta(f"p{step}"),
        release_id=release,
        alias="bot",
        candidate_version_id="ver_c",
        stable_version_id="ver_s",
        step_index=step,
        weight=weight,
        final=final,
    )


def _rollback(
    stable: str = "ver_s", candidate: str = "ver_c", release: str = "rel_1"
) -> events_pb2.ReleaseRollback:
    return events_pb2.ReleaseRollback(
        meta=_meta("r"),
        release_id=release,
        alias="bot",
        candidate_version_id=candidate,
        stable_version_id=stable,
    )


def _spec(candidate: str = "ver_c", **fields: Any) -> release_spec.ReleaseSpec:
    request = gateway_pb2.StartReleaseRequest(alias="bot", candidate_version_id=candidate, **fields)
    return release_spec.from_request(request, candidate)


def _started() -> gateway_pb2.Route:
    base = route_rules.set_route(None, "bot", "ver_s")
    return route_rules.start_release(base, _spec(), "rel_1")


def test_start_release_defaults_and_preconditions() -> None:
    route = _started()
    assert list(route.steps) == [5, 25, 50, 100]
    assert (route.candidate_version_id, route.candidate_weight, route.step_index) == ("ver_c", 5, 0)
    assert (route.release_state, route.hold_seconds, route.shadow_percent) == ("running", 300, 0)
    with pytest.raises(FailedPrecondition, match="already has release rel_1"):
        route_rules.start_release(route, _spec("ver_d"), "rel_2")
    with pytest.raises(FailedPrecondition, match="SetRoute first"):
        route_rules.start_release(None, _spec(), "rel_2")
    base = route_rules.set_route(None, "bot", "ver_s")
    with pytest.raises(InvalidArgument, match="already the stable"):
        route_rules.start_release(base, _spec("ver_s"), "rel_2")


@pytest.mark.parametrize("steps", [[0, 50], [50, 25], [10, 10], [50, 101]])
def test_steps_are_validated(steps: list[int]) -> None:
    with pytest.raises(InvalidArgument):
        release_spec.validate_steps(steps)


def test_promote_steps_then_final() -> None:
    route = _started()
    step1 = route_rules.apply_promote(route, _promote(1, 25))
    assert step1 is not None
    assert (step1.candidate_weight, step1.step_index) == (25, 1)
    assert route.candidate_weight == 5  # input untouched
    # Same step again (a duplicate decision) and a step backwards change nothing.
    assert route_rules.apply_promote(step1, _promote(1, 25)) is None
    assert route_rules.apply_promote(step1, _promote(0, 5)) is None
    final = route_rules.apply_promote(step1, _promote(3, 100, final=True))
    assert final is not None
    assert final.stable_version_id == "ver_c"
    assert final.previous_version_id == "ver_s"
    assert final.candidate_version_id == ""
    assert final.candidate_weight == 0
    assert route_rules.weights(final) == {"ver_c": 100}
    # A late promote for the finished release is ignored.
    assert route_rules.apply_promote(final, _promote(2, 50)) is None


def test_decisions_of_another_release_are_ignored() -> None:
    route = _started()
    assert route_rules.apply_promote(route, _promote(1, 25, release="rel_old")) is None
    assert route_rules.apply_rollback(route, _rollback(release="rel_old")) is None


def test_rollback_of_running_release() -> None:
    route = route_rules.apply_promote(_started(), _promote(1, 25))
    assert route is not None
    assert route_rules.weights(route) == {"ver_c": 25, "ver_s": 75}
    back = route_rules.apply_rollback(route, _rollback())
    assert back is not None
    assert (back.stable_version_id, back.candidate_version_id, back.candidate_weight) == (
        "ver_s",
        "",
        0,
    )
    # Promotions after the rollback and a second rollback are ignored.
    assert route_rules.apply_promote(back, _promote(2, 50)) is None
    assert route_rules.apply_rollback(back, _rollback()) is None


def test_rollback_after_completed_promotion_restores_previous() -> None:
    final = route_rules.apply_promote(_started(), _promote(3, 100, final=True))
    assert final is not None
    restored = route_rules.apply_rollback(final, _rollback(stable="ver_s", candidate="ver_c"))
    assert restored is not None
    assert restored.stable_version_id == "ver_s"
    assert restored.candidate_version_id == ""
    # Applying it again cannot flip the route a second time.
    assert (
        route_rules.apply_rollback(restored, _rollback(stable="ver_s", candidate="ver_c")) is None
    )
    # A rollback naming some other version is not a rollback of this promotion.
    assert route_rules.apply_rollback(final, _rollback(stable="ver_x", candidate="ver_c")) is None


def test_set_route_ends_release_and_keeps_previous() -> None:
    route = route_rules.set_route(_started(), "bot", "ver_n")
    assert (route.stable_version_id, route.previous_version_id) == ("ver_n", "ver_s")
    assert (route.candidate_version_id, route.candidate_weight) == ("", 0)
    # The release stays on record as replaced; nothing routes to its candidate.
    assert (route.release_id, route_rules.state_of(route)) == ("rel_1", "replaced")
    assert route_rules.weights(route) == {"ver_n": 100}


def test_analysis_defaults() -> None:
    full = release_spec.analysis_with_defaults(None)
    assert (full.min_requests, full.max_error_rate, full.max_latency_ratio, full.auto) == (
        20,
        0.05,
        3.0,
        True,
    )
    given = release_spec.analysis_with_defaults(
        events_pb2.AnalysisSettings(min_requests=5, auto=True, alpha=0.01, max_divergence=0.3)
    )
    assert (given.min_requests, given.max_error_rate, given.max_latency_ratio) == (5, 0.05, 0.0)
    # Settings the monitor interprets travel through unchanged.
    assert given.alpha == 0.01
    assert given.max_divergence == pytest.approx(0.3)


def _picked(pool: EndpointPool, version: str, exclude: tuple[str, ...] = ()) -> str:
    endpoint = pool.pick(version, exclude=exclude)
    return endpoint.address if endpoint is not None else ""


def test_endpoint_pick_prefers_loaded_then_least_busy() -> None:
    pool = EndpointPool(["a:1", "b:2"])
    pool.mark_loaded("c:3", "ver_x")
    assert _picked(pool, "ver_x") == "c:3"
    pool.add("c:3").outstanding = 3
    # Still the only one with the version loaded.
    assert _picked(pool, "ver_x") == "c:3"
    pool.add("a:1").outstanding = 2
    # Nobody has ver_y: least busy of all.
    assert _picked(pool, "ver_y") == "b:2"
    assert _picked(pool, "ver_x", exclude=("c:3",)) == "b:2"
    assert _picked(EndpointPool(), "ver_x") == ""


def test_endpoint_pick_skips_replicas_of_another_base_model() -> None:
    pool = EndpointPool(["static:1"])
    pool.add("other:2").base_fingerprint = "fp-other"
    tiny = pool.add("tiny:3")
    tiny.base_fingerprint = "fp-tiny"
    pool.add("static:1").outstanding = 5
    tiny.outstanding = 1

    def picked(base: str, exclude: tuple[str, ...] = ()) -> str:
        endpoint = pool.pick("ver_x", exclude=exclude, base_fingerprint=base)
        return endpoint.address if endpoint is not None else ""

    assert picked("fp-tiny") == "tiny:3"  # the other base's idle replica is never chosen
    assert picked("fp-tiny", exclude=("tiny:3",)) == "static:1"  # unknown base fits any
    assert picked("fp-other") == "other:2"
    assert picked("fp-third", exclude=("static:1",)) == ""
    assert picked("") == "other:2"  # the base model itself: any replica
